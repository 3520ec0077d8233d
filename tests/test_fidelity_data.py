"""Dataset mixtures and data-file errors against TRL 1.16 (`trl.scripts.utils.get_dataset`) on identical files."""

from __future__ import annotations

import json

import pytest
from trl.scripts.utils import DatasetConfig as TRLDatasetConfig
from trl.scripts.utils import DatasetMixtureConfig as TRLDatasetMixtureConfig
from trl.scripts.utils import get_dataset as trl_get_dataset

from trl_jax.configs import DatasetConfig, DatasetMixtureConfig
from trl_jax.data.loading import DatasetFileError, load_dataset_any, load_dataset_mixture, mixture_row_counts


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _files(tmp_path, lengths):
    return [_write(tmp_path / f"d{i}.jsonl", [{"text": f"d{i}-{j}", "src": i} for j in range(n)])
            for i, n in enumerate(lengths)]


def _both(files, fractions, **mixture_kw):
    ours = DatasetMixtureConfig(
        datasets=[DatasetConfig(path="json", data_files=f, fraction=fr) for f, fr in zip(files, fractions)],
        **mixture_kw,
    )
    theirs = TRLDatasetMixtureConfig(
        datasets=[TRLDatasetConfig(path="json", data_files=f, fraction=fr) for f, fr in zip(files, fractions)],
        **mixture_kw,
    )
    return ours, theirs


@pytest.mark.parametrize(
    "lengths, fractions",
    [
        ([17, 17], [0.75, 0.25]),  # the case: TRL keeps 17 + 6 = 23 rows
        ([17, 17], [0.5, 0.5]),
        ([40, 10, 25], [0.2, 0.3, 0.5]),
        ([30, 12], [3.0, 1.0]),  # unnormalised shares
        ([9, 20], [0.0, 1.0]),  # a zero share drops that dataset
        ([2000], [0.5]),  # one dataset: its share is 1, every row is kept
        ([21, 5, 7], [0.125, 0.125, 0.75]),  # round-half cases
        ([17, 17], [None, None]),  # no fractions: everything, concatenated
    ],
)
def test_mixture_fractions_match_trl(tmp_path, lengths, fractions):
    files = _files(tmp_path, lengths)
    ours, theirs = _both(files, fractions)
    expected = trl_get_dataset(theirs)["train"]
    got = load_dataset_mixture(ours)["train"]
    assert got.to_list() == expected.to_list()
    counts = mixture_row_counts(lengths, fractions)
    assert sum(counts) == len(expected)
    if lengths == [17, 17] and fractions == [0.75, 0.25]:
        assert len(got) == 23


def test_mixture_partial_fractions_rejected_like_trl(tmp_path):
    files = _files(tmp_path, [5, 5])
    ours, theirs = _both(files, [0.5, None])
    with pytest.raises(ValueError, match="either all datasets in the mixture or none"):
        trl_get_dataset(theirs)
    with pytest.raises(ValueError, match=r"either all datasets in the mixture or none of them.*datasets \[1\]"):
        load_dataset_mixture(ours)


def test_mixture_fraction_with_streaming_rejected_like_trl(tmp_path):
    files = _files(tmp_path, [5, 5])
    ours, theirs = _both(files, [0.5, 0.5], streaming=True)
    with pytest.raises(ValueError, match="not supported with streaming"):
        trl_get_dataset(theirs)
    with pytest.raises(ValueError, match="not supported with streaming.*streaming: false"):
        load_dataset_mixture(ours)


def test_mixture_streaming_concatenates_like_trl(tmp_path):
    files = _files(tmp_path, [3, 4])
    ours, theirs = _both(files, [None, None], streaming=True)
    assert list(load_dataset_mixture(ours)["train"]) == list(trl_get_dataset(theirs)["train"])


def test_mixture_fraction_sign_checked(tmp_path):
    with pytest.raises(ValueError, match="positive sum"):
        mixture_row_counts([3, 3], [0.0, 0.0])
    with pytest.raises(ValueError, match=">= 0"):
        mixture_row_counts([3, 3], [-0.5, 1.0])


# ---------------------------------------------------------------------------------------------- data-file errors


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl_names_file_and_fix(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetFileError, match=r"empty\.jsonl is empty \(no rows\)\. Write one JSON object per line") as e:
        load_dataset_any(str(path))
    assert e.value.__cause__ is None and e.value.__suppress_context__  # one error, not a chained traceback


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n\n{"a": 3,\n{"a": 4}\n')
    with pytest.raises(DatasetFileError, match=r"bad\.jsonl, line 4, column 9: invalid JSON .*fix or remove line 4"):
        load_dataset_any(str(path))


def test_jsonl_line_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DatasetFileError, match=r"list\.jsonl, line 2: an array, not a JSON object"):
        load_dataset_any(str(path))


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"a": 1},\n {"a": 2\n]\n')
    with pytest.raises(DatasetFileError, match=r"bad\.json, line 4, column 1: invalid JSON"):
        load_dataset_any(str(path))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DatasetFileError, match="empty JSON array"):
        load_dataset_any(str(tmp_path / "empty.json"))


def test_bad_file_in_a_mixture_is_named(tmp_path):
    good = _files(tmp_path, [3])[0]
    empty = tmp_path / "nothing.jsonl"
    empty.write_text("")
    mixture = DatasetMixtureConfig(datasets=[DatasetConfig(path=good), DatasetConfig(path=str(empty))])
    with pytest.raises(DatasetFileError, match=r"nothing\.jsonl is empty"):
        load_dataset_mixture(mixture)


def test_bad_file_behind_path_json_is_named(tmp_path):
    """TRL's `path: json` + `data_files:` form gets the same one-line error."""
    good = _files(tmp_path, [3])[0]
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    mixture = DatasetMixtureConfig(datasets=[DatasetConfig(path="json", data_files=[good, str(bad)])])
    with pytest.raises(DatasetFileError, match=r"broken\.jsonl, line 2, column 10: invalid JSON"):
        load_dataset_mixture(mixture)
