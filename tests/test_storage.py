"""Storage: atomic writes and listings, local and on the GCS emulator."""

import pytest

from muse.layout import (IMAGES, done_among, done_generations, done_marker, done_shards, format_shard_id, key_order,
                         make_key, parse_shard_id, parse_shard_name, shard_id_of, shard_name)
from muse.storage import Storage, source_fs

SPARSE = [7, 99999, 100000, 123456, 10 ** 7]  # past 5 digits, without 100,000 shards


def test_shard_names_round_trip():
    assert shard_name("images", 42) == "images/00042.parquet"  # today's names stay valid
    assert shard_name("images", 42, "_stats.json") == "images/00042_stats.json"
    assert shard_id_of("gs://b/p/images/00042_stats.json") == 42
    for sid in SPARSE + [0]:
        assert parse_shard_id(format_shard_id(sid)) == sid
        assert shard_id_of(done_marker("encoded/v1", sid)) == sid and shard_id_of(shard_name(IMAGES, sid)) == sid
    assert shard_name(IMAGES, 123456) == "images/123456.parquet" and shard_id_of("123456.json") == 123456
    for bad in ("042", "0123456", "4a", "", "-1", "１２３４５"):  # not how an id is spelled
        assert parse_shard_id(bad) is None
    with pytest.raises(ValueError):
        format_shard_id(-1)


def test_row_keys_unique_and_ordered_past_five_digits():
    assert make_key(42, 7, 10_000) == "0004200007"  # the keys existing data was written with
    keys = [make_key(sid, row, size) for size in (1000,) for sid in SPARSE for row in (0, 1, size - 1)]
    assert len(set(keys)) == len(keys)
    assert sorted(keys, key=key_order) == keys  # (shard, row) order, for ids of any size
    wide = [make_key(sid, row, 250_000) for sid in (99999, 100000) for row in (0, 249_999)]
    assert sorted(wide, key=key_order) == wide and len({len(k) for k in wide}) == 2


def test_done_shards_with_sparse_large_ids_and_stray_names(tmp_path):
    """Ids past 99,999 are found by one listing; a file whose name is another spelling of an id
    (42.parquet next to 00042_stats.json) is not a shard."""
    st = Storage(str(tmp_path))
    for sid in SPARSE:
        st.write_bytes(shard_name(IMAGES, sid), b"x")
        st.write_json(done_marker(IMAGES, sid), {})
    st.write_bytes("images/42.parquet", b"x")
    st.write_json("images/00042_stats.json", {})
    st.write_bytes("images/0123457.parquet", b"x")
    st.write_json("images/123457_stats.json", {})
    assert done_shards(st, IMAGES) == SPARSE


def test_write_read_list(any_root):
    st = Storage(any_root)
    st.write_bytes("images/00001.parquet", b"one")
    st.write_json("images/00001_stats.json", {"rows_in": 1})
    st.write_bytes("images/00002.parquet", b"two")  # no stats: not complete
    assert st.read_bytes("images/00001.parquet") == b"one"
    assert st.read_json("images/00001_stats.json") == {"rows_in": 1}
    assert st.list("images", ".parquet") == ["images/00001.parquet", "images/00002.parquet"]
    assert done_shards(st, IMAGES) == [1]
    st.delete("images/00001_stats.json")
    assert done_shards(Storage(any_root), IMAGES) == []


def test_done_among_lists_only_the_names_of_its_ids(any_root, monkeypatch):
    """A task's own shards by the done rule; on GCS the listing holds only the names that share the
    ids' prefix, not the whole folder."""
    st = Storage(any_root)
    for sid in [*range(25), 99999, 100000]:
        st.write_bytes(shard_name(IMAGES, sid), b"x")
        st.write_json(done_marker(IMAGES, sid), {})
    st.write_bytes(shard_name(IMAGES, 25), b"x")  # no marker: not done
    ls, returned = st.fs.ls, []
    monkeypatch.setattr(st.fs, "ls", lambda *a, **k: returned.append(len(out := ls(*a, **k))) or out)  # fs is shared
    assert done_among(st, IMAGES, range(20, 26)) == [20, 21, 22, 23, 24]
    assert done_among(st, IMAGES, [99999, 100000, 100001]) == [99999, 100000]  # no common prefix: all names
    assert done_among(st, IMAGES, [30, 31]) == [] and done_among(st, IMAGES, []) == []
    if not st.is_local:  # "0002": 00020..00025 (11 files) of 55
        assert returned[0] == 11, returned


def test_done_rule_is_the_same_for_both_phases(tmp_path):
    """A shard is done when its Parquet file and its marker exist; underscore files are not shards."""
    st = Storage(str(tmp_path))
    ds = "encoded/v1"
    assert done_marker(IMAGES, 3) == "images/00003_stats.json" and done_marker(ds, 3) == "encoded/v1/00003.json"
    for sid in (1, 2, 3):
        st.write_bytes(f"{ds}/{sid:05d}.parquet", b"x")
    st.write_json(f"{ds}/00001.json", {"rows": 1})
    st.write_json(f"{ds}/00004.json", {"rows": 1})  # a record without its data: not done
    st.write_json(f"{ds}/_MANIFEST.json", {})
    st.write_json(f"{ds}/00002_stats.json", {})      # the other phase's marker does not count here
    assert done_shards(st, ds) == [1]


class Boom(Exception):
    pass


def test_failed_write_leaves_nothing(any_root, monkeypatch):
    st = Storage(any_root)
    st.write_bytes("images/keep.bin", b"old")

    def chunks():
        yield b"partial"
        raise Boom

    with pytest.raises(Boom):
        st.write_bytes("images/new.bin", b"".join(chunks()))  # body fails before any write
    assert not st.exists("images/new.bin")
    # a failure inside the write itself: the target keeps its old content, no temp file left
    if st.is_local:
        import os

        def bad_replace(src, dst):
            raise OSError("disk full")

        monkeypatch.setattr(os, "replace", bad_replace)
        with pytest.raises(OSError, match="disk full"):
            st.write_bytes("images/keep.bin", b"new")
        monkeypatch.undo()
        assert st.list("images") == ["images/keep.bin"]
    else:
        def bad_pipe(path, data, **kw):
            raise OSError("upload failed")

        monkeypatch.setattr(st.fs, "pipe_file", bad_pipe)
        with pytest.raises(OSError, match="upload failed"):
            st.write_bytes("images/keep.bin", b"new")
        monkeypatch.undo()
    assert Storage(any_root).read_bytes("images/keep.bin") == b"old"


def test_source_fs_opens_local_and_gcs(tmp_path, gcs_root):
    (tmp_path / "u.csv").write_text("URL,TEXT\n")
    fs, path = source_fs(str(tmp_path / "u.csv"))
    assert fs.cat_file(path) == b"URL,TEXT\n"
    Storage(gcs_root).write_bytes("src/u.csv", b"x")
    fs, path = source_fs(gcs_root + "/src/u.csv")
    assert fs.cat_file(path) == b"x"


def test_relative_maps_only_paths_under_the_root(tmp_path):
    s = Storage(str(tmp_path / "root"))
    root = s.url("")
    assert s.relative("checkpoints/a") == "checkpoints/a"
    assert s.relative(root + "/checkpoints/a") == "checkpoints/a"
    assert s.relative(root) == ""
    assert s.relative(root + "2/checkpoints/a") is None      # a sibling folder sharing the prefix
    assert s.relative("/elsewhere/x") is None and s.relative("gs://b/x") is None


def test_read_many_and_sizes(any_root):
    st = Storage(any_root)
    files = {f"d/{i:03d}.json": f'{{"i": {i}}}'.encode() for i in range(20)}
    st.write_many(files)
    assert st.read_many(list(files)) == files and st.read_many([]) == {}
    assert st.sizes("d") == {rel: len(data) for rel, data in files.items()} and st.sizes("nowhere") == {}
    with pytest.raises(FileNotFoundError):
        st.read_many(["d/000.json", "d/missing.json"])


def test_gcs_transfers_are_checked_with_crc32c(gcs_root, gcs_proxy):
    """fake-gcs-server, like GCS, answers each upload and download with the object's crc32c; a
    transfer that changes bytes (the fault proxy flips one) is done again, and named when it keeps
    doing so."""
    import muse.storage as storage_module

    st = Storage(gcs_root, retry=storage_module.RetryPolicy(retries=2, base_s=0.01))
    data = bytes(range(256)) * 64
    st.write_bytes("images/a.bin", data)
    assert st.fs.info(st.path("images/a.bin"))["crc32c"] == storage_module.crc32c(data)
    assert st.read_bytes("images/a.bin") == data
    gcs_proxy.fail_always("images/a.bin", "flip", kind="read", times=1)  # once: the second try is right
    assert st.read_bytes("images/a.bin") == data and gcs_proxy.faults() == {("read", "flip"): 1}
    gcs_proxy.fail_always("images/b.bin", "flip", kind="upload", times=1)
    st.write_bytes("images/b.bin", data)
    assert gcs_proxy.faults()[("upload", "flip")] == 1
    assert st.fs.info(st.path("images/b.bin"))["crc32c"] == storage_module.crc32c(data)
    gcs_proxy.fail_always("images/a.bin", "flip", kind="read")  # every try
    with pytest.raises(storage_module.IntegrityError, match=r"GET gs://.*/images/a.bin: failed after 3 tries.*"
                       r"read 16384 bytes with crc32c"):
        st.read_bytes("images/a.bin")
    gcs_proxy.fail_always("images/c.bin", "flip", kind="upload")
    with pytest.raises(storage_module.IntegrityError, match=r"images/c.bin: failed after 3 tries.* stored with a "
                       r"crc32c other than the bytes sent; deleted"):
        st.write_bytes("images/c.bin", data)
    assert not st.exists("images/c.bin")  # not left with bytes nobody wrote
    big = data * (51 * 64)  # 51 MiB: past gcsfs's chunked uploads, still one request (Storage's chunk size)
    st.write_bytes("images/big.bin", big)
    assert st.read_bytes("images/big.bin") == big
    st.write_many({"images/d.bin": data, "images/e.bin": b"x"})  # the batch path, checked alike
    assert st.read_many(["images/d.bin", "images/e.bin"]) == {"images/d.bin": data, "images/e.bin": b"x"}


def test_browser_urls_gcs_only_and_signed_urls_verify_with_a_service_account_key(tmp_path, monkeypatch):
    """The console URL for gs:// (quoted), none for a local root; a V4 signed URL from a service-account
    key (made here: signing is local, no network) whose signature the key's public half verifies."""
    import hashlib
    import json
    from urllib.parse import parse_qs, urlsplit

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    assert Storage(str(tmp_path)).browser_url("samples/a.png") is None
    assert Storage(str(tmp_path)).signed_url("samples/a.png") is None
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    sa = {"type": "service_account", "project_id": "p", "private_key_id": "k1", "private_key": pem,
          "client_email": "muse@p.iam.gserviceaccount.com", "client_id": "1",
          "token_uri": "https://oauth2.googleapis.com/token"}
    (tmp_path / "sa.json").write_text(json.dumps(sa))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "sa.json"))
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)  # the real endpoint, never contacted
    st = Storage("gs://bucket/runs one", "p")
    assert st.browser_url("samples/a b.png") == "https://storage.cloud.google.com/bucket/runs%20one/samples/a%20b.png"
    url = st.signed_url("samples/a b.png", 3600)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert (parts.netloc, parts.path) == ("storage.googleapis.com", "/bucket/runs%20one/samples/a%20b.png")
    assert query["X-Goog-Expires"] == ["3600"] and query["X-Goog-Credential"][0].startswith(sa["client_email"])
    # GCS's V4 scheme: the string to sign hashes the canonical request (query minus the signature)
    canonical = "\n".join(["GET", parts.path, parts.query.split("&X-Goog-Signature=")[0],
                           "host:storage.googleapis.com\n", "host", "UNSIGNED-PAYLOAD"])
    scope = query["X-Goog-Credential"][0].split("/", 1)[1]
    to_sign = "\n".join(["GOOG4-RSA-SHA256", query["X-Goog-Date"][0], scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key.public_key().verify(bytes.fromhex(query["X-Goog-Signature"][0]), to_sign.encode(), padding.PKCS1v15(),
                            hashes.SHA256())  # raises InvalidSignature when it does not hold


def test_generation_names_round_trip():
    """Generation 0 keeps today's names; K >= 1 is tagged ".gK"; no other spelling is a shard."""
    assert shard_name(IMAGES, 42, generation=1) == "images/00042.g1.parquet"
    assert done_marker(IMAGES, 42, 12) == "images/00042.g12_stats.json"
    assert done_marker("encoded/v1", 123456, 3) == "encoded/v1/123456.g3.json"
    for sid in SPARSE + [0]:
        for gen in (0, 1, 2, 10):
            for name in (shard_name(IMAGES, sid, generation=gen), done_marker(IMAGES, sid, gen),
                         done_marker("encoded/v1", sid, gen)):
                assert parse_shard_name(name) == (sid, gen) and shard_id_of(name) == sid
    for bad in ("00042.g0.parquet", "00042.g01.parquet", "42.g1.parquet", "00042.g.parquet", "00042.gx1.json"):
        assert parse_shard_name(bad) is None, bad
    with pytest.raises(ValueError):
        shard_name(IMAGES, 1, generation=-1)


def test_newest_finished_generation_is_in_force(any_root):
    """A generation counts once its marker exists: an unfinished g2 leaves g1 in force, a
    marker without its Parquet file counts for nothing, and stray names are ignored."""
    st = Storage(any_root)

    def put(sid, gen, marker=True, data=True):
        if data:
            st.write_bytes(shard_name(IMAGES, sid, generation=gen), b"x")
        if marker:
            st.write_json(done_marker(IMAGES, sid, gen), {})

    put(1, 0)
    put(1, 1)
    put(1, 2, marker=False)          # a retry killed before its marker
    put(2, 0)
    put(2, 3, data=False)            # a marker whose data is gone
    put(3, 0, marker=False)
    put(3, 1)                        # only g1 finished (g0's marker lost): g1 stands alone
    put(100000, 0)
    put(100000, 10)                  # 10 sorts after 2 as a number, not as a string
    put(100000, 2)
    st.write_bytes("images/00004.g01.parquet", b"x")
    st.write_json("images/00004.g01_stats.json", {})
    assert done_generations(st, IMAGES) == {1: 1, 2: 0, 3: 1, 100000: 10}
    assert done_shards(st, IMAGES) == [1, 2, 3, 100000]
    assert done_among(st, IMAGES, [1, 2, 3]) == [1, 2, 3]
