"""Prefect 3 flows over the `muse` library (which never imports Prefect).

download / encode / train / pipeline flows take `config_path` + `overrides` (the same
`--set key=value` strings as the CLI), so a run started from the Prefect UI shows and
accepts them. Tasks are shard-sized and pass storage URIs and small dicts, never payloads.
"""
