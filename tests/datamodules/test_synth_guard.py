"""Generated shards land only where meant (issue 12 item 3): a mistyped data_dir is an error naming it."""

from __future__ import annotations

import pytest

import datamodules.synth
from datamodules.bench import EditBenchDataModule
from datamodules.correspondence import CorrespondenceDataModule


@pytest.fixture
def generated(monkeypatch):
    """The (kind, folder) of each synthesize call, without generating anything."""
    calls = []
    monkeypatch.setattr(
        datamodules.synth, "synthesize", lambda kind, out, **kw: calls.append((kind, str(out)))
    )
    return calls


def test_a_missing_data_dir_elsewhere_is_an_error_naming_it(in_tmp, generated):
    with pytest.raises(FileNotFoundError, match="data/corespondence"):
        CorrespondenceDataModule(data_dir="data/corespondence").prepare_data()
    assert generated == [] and not (in_tmp / "data").exists()


def test_the_suites_own_folder_is_generated_by_default(in_tmp, generated):
    CorrespondenceDataModule(data_dir="data/correspondence").prepare_data()
    CorrespondenceDataModule(data_dir=str(in_tmp / "data" / "correspondence")).prepare_data()  # same folder
    assert generated == [
        ("correspondence", "data/correspondence"),
        ("correspondence", f"{in_tmp}/data/correspondence"),
    ]


def test_asking_generates_anywhere_and_false_never_does(in_tmp, generated):
    CorrespondenceDataModule(data_dir="mine/a", synth=True).prepare_data()
    CorrespondenceDataModule(
        data_dir="mine/b", synth_samples={"train": 4}
    ).prepare_data()  # counts given: asked
    assert [out for _, out in generated] == ["mine/a", "mine/b"]
    with pytest.raises(FileNotFoundError, match="synth: false"):
        CorrespondenceDataModule(data_dir="data/correspondence", synth=False).prepare_data()
    (in_tmp / "existing").mkdir()
    CorrespondenceDataModule(
        data_dir="existing"
    ).prepare_data()  # exists: read as it is (its loader says what lacks)
    assert len(generated) == 2


def test_a_benchmark_of_shards_follows_the_same_rule(in_tmp, generated):
    with pytest.raises(FileNotFoundError, match="data/multirf"):
        EditBenchDataModule(benchmark="shards", data_dir="data/multirf").prepare_data()
    EditBenchDataModule(benchmark="shards", data_dir="data/multiref").prepare_data()
    assert generated == [("multiref", "data/multiref")]
