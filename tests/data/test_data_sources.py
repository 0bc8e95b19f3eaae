"""Every source kind: rows, their origin and their exact line (or record) numbers."""

from __future__ import annotations

import json

import pytest

from align.data import DataError, DataStats, read_rows

ROWS = [{"a": 1}, {"a": 2}, {"a": 3}]


def _triples(rows):
    return [(r.origin, r.line, r.data) for r in rows]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_line_numbers_count_blank_lines(tmp_path, write_jsonl, gz):
    path = write_jsonl(tmp_path / ("x.jsonl.gz" if gz else "x.jsonl"), [ROWS[0], "", "  ", ROWS[1], ROWS[2]], gz=gz)
    stats = DataStats()
    rows = list(read_rows(path, stats=stats))
    assert _triples(rows) == [(path, 1, {"a": 1}), (path, 4, {"a": 2}), (path, 5, {"a": 3})]
    assert stats.rows_read == 3


@pytest.mark.parametrize("gz", [False, True])
def test_invalid_json_line_names_file_and_line(tmp_path, write_jsonl, gz):
    path = write_jsonl(tmp_path / ("bad.jsonl.gz" if gz else "bad.jsonl"), [ROWS[0], ROWS[1], '{"a": 3,'], gz=gz)
    with pytest.raises(DataError, match=r"bad\.jsonl(\.gz)?, line 3: not valid JSON") as info:
        list(read_rows(path))
    assert (info.value.origin, info.value.line, info.value.reason) == (path, 3, "invalid_json")


def test_invalid_json_skipped_and_counted(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], "not json", "[1, 2]", ROWS[2]])
    stats = DataStats()
    rows = list(read_rows(path, on_error="skip", stats=stats))
    assert [r.line for r in rows] == [1, 4]
    assert stats.rows_read == 4 and stats.rows_skipped == {"invalid_json": 2}


def test_jsonl_line_that_is_not_an_object(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "x.jsonl", [ROWS[0], "[1, 2]"])
    with pytest.raises(DataError, match=r"x\.jsonl, line 2: expected a JSON object, got list"):
        list(read_rows(path))


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_or_data_key(tmp_path, wrap):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"data": ROWS} if wrap else ROWS))
    assert _triples(read_rows(str(path))) == [(str(path), i + 1, r) for i, r in enumerate(ROWS)]


def test_json_of_wrong_shape(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(DataError, match=r"x\.json, record 1: expected a list of objects"):
        list(read_rows(str(path)))
    path.write_text(json.dumps([ROWS[0], 7]))
    with pytest.raises(DataError, match=r"x\.json, record 2: expected a JSON object, got int"):
        list(read_rows(str(path)))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "x.parquet")
    rows = [{"prompt": f"p{i}", "n": i} for i in range(2500)]  # more than one record batch
    pq.write_table(pa.Table.from_pylist(rows), path)
    got = list(read_rows(path))
    assert [r.data for r in got] == rows
    assert [r.line for r in got] == list(range(1, 2501))


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert [r.data for r in read_rows(str(tmp_path / "ds"))] == ROWS

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "test": datasets.Dataset.from_list([{"a": 9}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.data for r in read_rows(str(tmp_path / "dd"))] == ROWS  # default split: train
    test_rows = list(read_rows(str(tmp_path / "dd"), split="test"))
    assert _triples(test_rows) == [(f"{tmp_path / 'dd'}[test]", 1, {"a": 9})]
    with pytest.raises(KeyError, match=r"no split 'validation'; available: \['test', 'train'\]"):
        list(read_rows(str(tmp_path / "dd"), split="validation"))


def test_folder_of_files_and_split_selection(tmp_path, write_jsonl):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "b_train.jsonl", [{"f": "b"}])
    write_jsonl(folder / "a-train.jsonl.gz", [{"f": "a"}], gz=True)
    write_jsonl(folder / "test.jsonl", [{"f": "t"}])
    (folder / "notes.txt").write_text("ignored")
    assert [r.data["f"] for r in read_rows(str(folder))] == ["a", "b", "t"]  # sorted by name
    assert [r.data["f"] for r in read_rows(str(folder), split="train")] == ["a", "b"]
    assert [r.data["f"] for r in read_rows(str(folder), split="test")] == ["t"]
    with pytest.raises(FileNotFoundError, match="no file for split 'validation'"):
        list(read_rows(str(folder), split="validation"))


def test_glob(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "x1.jsonl", [ROWS[0]])
    write_jsonl(tmp_path / "x2.jsonl", [ROWS[1]])
    write_jsonl(tmp_path / "y.jsonl", [ROWS[2]])
    assert [r.data for r in read_rows(str(tmp_path / "x*.jsonl"))] == ROWS[:2]


def test_hub_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config_name=None, *, split):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = list(read_rows("openai/gsm8k", split="test", config_name="main"))
    assert calls == [("openai/gsm8k", "main", "test")]
    assert _triples(rows) == [("openai/gsm8k[test]", i + 1, r) for i, r in enumerate(ROWS)]
    list(read_rows("Anthropic/hh-rlhf"))
    assert calls[-1] == ("Anthropic/hh-rlhf", None, "train")


def test_missing_local_path_is_not_sent_to_the_hub(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub called"))
    with pytest.raises(FileNotFoundError, match="no such data file"):
        list(read_rows("data/missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such data file"):
        list(read_rows(str(tmp_path / "nope")))


def test_real_shipped_files(shared_data, hh_files):
    hh = list(read_rows(str(shared_data / "hh-rlhf" / "helpful-base_test.jsonl.gz")))
    assert len(hh) == 2354 and [r.line for r in hh] == list(range(1, 2355))
    assert set(hh[0].data) == {"chosen", "rejected"}
    stats = DataStats()
    total = sum(1 for _ in read_rows(str(shared_data / "hh-rlhf" / "*.jsonl.gz"), stats=stats))
    assert total == stats.rows_read == 5803 and len(hh_files) == 3
    gsm = list(read_rows(str(shared_data / "gsm8k" / "train.jsonl")))
    assert len(gsm) == 7473 and gsm[-1].line == 7473 and "####" in gsm[0].data["answer"]
