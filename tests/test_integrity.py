"""Integrity on every read (issue 27 item 4): shards carry Parquet page checksums, the loader and
`muse eval` verify them, so bytes changed at the same size are a named error, not other data."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse import evaluate, train
from muse.config import load_config
from muse.data import LoaderSettings, StreamingDataset, iter_eval_rows
from muse.layout import DataError, dataset_dir, shard_name
from muse.storage import Storage
from muse.testing.datasets import write_test_dataset
from tests.train_helpers import make_data, run_train, tiny_config

DS = "encoded/v"


def page_byte(data: bytes, row_group: int, column: str) -> int:
    """An offset inside the payload of the last page of a column chunk (its last bytes: the page
    header comes before them, so this is data, not framing)."""
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    names = [md.row_group(row_group).column(c).path_in_schema for c in range(md.num_columns)]
    cc = md.row_group(row_group).column(names.index(column))
    start = cc.dictionary_page_offset if cc.has_dictionary_page else cc.data_page_offset
    return start + cc.total_compressed_size - 5


def flip(storage: Storage, rel: str, at: int, mask: int = 0x01, count: int = 1) -> None:
    """Flip bits of `count` bytes from `at` in place: the file keeps its size (train.verify: size
    sees nothing)."""
    data = bytearray(storage.read_bytes(rel))
    for i in range(at, at + count):
        data[i] ^= mask
    storage.write_bytes(rel, bytes(data))


def _drain(ds: StreamingDataset, batches: int = 40) -> None:
    for _, _ in zip(range(batches), ds):
        pass


def test_every_shard_writer_writes_page_checksums(tmp_path):
    """A bit flipped in a page is refused at read, for each writer of shards: encode's, the
    download's (images/) and the test datasets' (what the trainer tests read)."""
    from muse.download.sources import ROW
    from muse.download.writer import build_shard
    from muse.encode.shards import _to_parquet

    st = Storage(str(tmp_path))
    write_test_dataset(st, DS, shards=1)
    test_shard = st.read_bytes(shard_name(DS, 0))
    rows = pa.table({"url": ["http://x/0.jpg", "http://x/1.jpg"], "caption": ["a", "b"], ROW: [0, 1]})
    fetched = pa.table({ROW: [0, 1], "status": ["failed_to_download"] * 2, "error_message": ["404"] * 2,
                        "jpg": pa.array([None, None], pa.binary())})
    written = {"test dataset": (test_shard, "t5"),
               "encode": (_to_parquet(pq.read_table(io.BytesIO(test_shard)), 8), "t5"),
               "download": (build_shard(rows, fetched, 0, 2, 16, 90)[0], "image")}
    for who, (data, column) in written.items():
        pq.ParquetFile(io.BytesIO(data), page_checksum_verification=True).read()  # intact: reads
        bad = bytearray(data)
        bad[page_byte(data, 0, column)] ^= 0x01
        with pytest.raises(OSError, match="CRC checksum"):
            pq.ParquetFile(io.BytesIO(bytes(bad)), page_checksum_verification=True).read()
            pytest.fail(f"{who}: a flipped bit was read")


def test_loader_names_the_shard_and_row_group_of_a_flipped_bit(any_root):
    """Locally and on GCS: one bit of a data page (same size, manifest untouched) stops the loader
    with the shard and row group named."""
    st = Storage(any_root)
    write_test_dataset(st, DS, shards=2, rows=24, row_group_size=8)
    rel = shard_name(DS, 1)
    flip(st, rel, page_byte(st.read_bytes(rel), 1, "vq16.list.element"))
    settings = LoaderSettings(batch_size=4, streams=1, shuffle_buffer=8)
    with pytest.raises(DataError) as e:
        _drain(StreamingDataset(any_root, DS, settings))
    assert f"{st.url(rel)} row group 1: corrupt: a page checksum does not match" in str(e.value)
    assert "muse encode" in str(e.value) and "\n" not in str(e.value)


def test_a_corrupt_footer_is_named(tmp_path):
    """A footer byte flipped so that it still parses: a column renamed, or the Arrow schema lost
    (its key renamed: vq16 read as a variable-size list): refused, not read as other data."""
    st = Storage(str(tmp_path))
    write_test_dataset(st, DS, shards=2, rows=24, row_group_size=8)
    data = st.read_bytes(shard_name(DS, 1))
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    settings = LoaderSettings(batch_size=4, streams=1, shuffle_buffer=8)
    for needle, said in ((b"t5_len", "no column 't5_len'"), (b"ARROW:schema", "column 'vq16' is list<")):
        st.write_bytes(shard_name(DS, 1), data)
        flip(st, shard_name(DS, 1), data.index(needle, footer), mask=0x02)
        with pytest.raises(DataError, match=said):
            _drain(StreamingDataset(str(tmp_path), DS, settings))
    # a footer that no longer parses: unreadable, named
    st.write_bytes(shard_name(DS, 1), data[:footer + 2] + bytes([data[footer + 2] ^ 0xFF]) + data[footer + 3:])
    with pytest.raises(DataError, match=r"00001.parquet row group \d: unreadable"):
        _drain(StreamingDataset(str(tmp_path), DS, settings))


def test_eval_reads_are_verified(tmp_path):
    """`muse eval`'s two reads: the eval slice of the encoded shards and the real images."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), eval_holdout=0.5)
    cfg = load_config(config)
    make_data(config, image_size=16)
    st = Storage.from_config(cfg)
    rows, _ = evaluate.eval_rows(cfg, st, 100)
    assert evaluate.real_images(st, rows, 16).shape == (len(rows), 16, 16, 3)
    shard = shard_name(dataset_dir(cfg), 1)
    data = st.read_bytes(shard)
    flip(st, shard, page_byte(data, 2, "t5"))
    with pytest.raises(DataError, match=rf"{shard} row group 2: corrupt: a page checksum"):
        list(iter_eval_rows(st, dataset_dir(cfg), 0.5))
    st.write_bytes(shard, data)
    flip(st, "images/00000.parquet", page_byte(st.read_bytes("images/00000.parquet"), 0, "image"))
    with pytest.raises(evaluate.EvalError, match="images/00000.parquet: image shard corrupt: a page checksum"):
        evaluate.real_images(st, rows, 16)


@pytest.mark.slow  # a training job (~20 s on 2 shared cores) + two in-process runs
def test_default_trainer_stops_on_changed_bytes(tmp_path, capsys):
    """The issue's held-out cases at train.verify: size (the default): the same size, the manifest
    untouched, so only what the shard carries can tell; on main each trained on and exited 0.
    One bit through `python -m muse.train` (the exit status), bytes and a footer flip in-process."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=4)
    manifest = make_data(config, shards=2, rows=24, row_group_size=8)
    st = Storage.from_config(load_config(config))
    rel = shard_name(dataset_dir(load_config(config)), 1)
    data = st.read_bytes(rel)
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    cases = [("one bit", page_byte(data, 2, "t5"), 0x01, 1, "corrupt: a page checksum does not match"),
             ("bytes", page_byte(data, 0, "vq16.list.element") - 40, 0xFF, 8, "corrupt: a page checksum"),
             ("footer", data.index(b"t5_len", footer), 0x01, 1, "no column 't5_len'")]
    for case, at, mask, count, said in cases:
        st.write_bytes(rel, data)
        flip(st, rel, at, mask, count)
        assert st.size(rel) == manifest["shards"][1]["bytes"]
        if case == "one bit":
            out = run_train(config)
            assert out.returncode == 2, out.stdout + out.stderr
            err = out.stderr
        else:
            assert train.main(["--config", str(config), "--set", f"train.run_name={case.replace(' ', '-')}"]) == 2
            err = capsys.readouterr().err
        line = [x for x in err.splitlines() if x.startswith("muse train: ")][-1]
        assert f"{st.url(rel)} row group " in line and "muse encode" in line and said in line, (case, err)


def test_encode_refuses_an_image_shard_with_changed_bytes(tmp_path):
    """encode reads images/ with the checksums verified: a flipped bit is named, not encoded."""
    from muse.encode import EncodeError
    from muse.encode.shards import _read_images

    st = Storage(str(tmp_path))
    write_test_dataset(st, DS, shards=1, image_size=16)
    assert _read_images(st, 0).num_rows == 24
    flip(st, "images/00000.parquet", page_byte(st.read_bytes("images/00000.parquet"), 0, "image"))
    with pytest.raises(EncodeError, match="images/00000.parquet: image shard corrupt: a page checksum"):
        _read_images(st, 0)


def test_default_trainer_on_gcs_names_a_flipped_bit(tmp_path, gcs_root, capsys):
    """The same on gs:// (in-process: the exit status is the local case's): named at start by the
    listing's crc32c; with a manifest that recorded none (encoded before), at its row group."""
    config = tiny_config(tmp_path, gcs_root, max_steps=4)
    manifest = make_data(config, shards=2, rows=24, row_group_size=8)
    st = Storage.from_config(load_config(config))
    ds = dataset_dir(load_config(config))
    rel = shard_name(ds, 0)
    flip(st, rel, page_byte(st.read_bytes(rel), 1, "t5"))
    for said in (f"{st.url(rel)}: crc32c ", f"{st.url(rel)} row group 1: corrupt: a page checksum"):
        assert train.main(["--config", str(config)]) == 2
        line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("muse train: ")][-1]
        assert line.startswith(f"muse train: {said}"), line
        st.write_json(f"{ds}/_MANIFEST.json", {**manifest, "shards": [
            {k: v for k, v in shard.items() if k != "crc32c"} for shard in manifest["shards"]]})


def test_size_check_on_gcs_compares_the_listed_crc32c(gcs_root):
    """On gs:// `train.verify: size` also compares each shard's crc32c, free in GCS's listing, with
    the one encode recorded: a byte changed at the same size is named at start, before any row
    group is read (and whatever the byte: a valid file that is not the one encoded too)."""
    from muse.data import verify_shards
    from muse.layout import read_manifest
    from muse.storage import crc32c

    st = Storage(gcs_root)
    manifest = write_test_dataset(st, DS, shards=2)
    assert manifest["shards"][1]["crc32c"] == crc32c(st.read_bytes(shard_name(DS, 1)))
    assert read_manifest(st, DS)["shards"][1]["crc32c"] == manifest["shards"][1]["crc32c"]  # via the table
    verify_shards(st, DS, manifest)
    flip(st, shard_name(DS, 1), 4, mask=0x01)  # the first page header's first byte: same size
    with pytest.raises(DataError, match=r"00001.parquet: crc32c .*, the manifest says .*changed after encoding"):
        verify_shards(st, DS, manifest)
    verify_shards(st, DS, {**manifest, "shards": [manifest["shards"][0]]})  # shard 0 still matches
