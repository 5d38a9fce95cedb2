"""``python -m bench faults`` in small (bench/faults.py): real ``train.py`` processes hit by SIGTERM and SIGKILL
at random steps and resumed until done, a second run in a busy run folder, and resumes with another batch size.

Each row compares against an uninterrupted reference run of the same plan (its samples per epoch, its weights).
"""

from __future__ import annotations

import pytest

from bench.faults import Plan, run_cases

PLAN = Plan(per_shard=12)  # 2 x 12 samples, batch 4: 6 steps an epoch, 12 steps, a checkpoint every 3 steps

# Resumes from a checkpoint at an epoch's end: these rows failed before dab13bd (a periodic checkpoint at an epoch's
# last step was taken for "the middle of the epoch", and a resume from a run that ended at an epoch's end stopped with
# "DataError: epoch N of data.train yielded no batch").
EPOCH_END_CASES = (
    "batch size 4 -> 8, epoch end (periodic checkpoint)",
    "batch size 4 -> 8, epoch end (run end)",
    "3 more steps after the run end",
    "SIGTERM at epoch end (every_n_train_steps 4)",
)


ALL_CASES = {"reference", "trial 0", "trial 1", "concurrent run", "batch size 4 -> 8, mid-epoch", *EPOCH_END_CASES}


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("faults")
    return {row["case"]: row for row in run_cases(work, PLAN, trials=2, seed=0)}


def _failures(rows: dict[str, dict], cases) -> dict[str, str]:
    return {case: rows[case]["notes"] for case in cases if rows[case]["outcome"] != "pass"}


@pytest.mark.slow
def test_sigterm_and_sigkill_at_random_steps_resume_to_the_reference_run(rows):
    # Every row is read by one of the tests here; a reference that failed leaves only its own row.
    assert set(rows) == ALL_CASES, _failures(rows, rows)
    sigterm, sigkill = rows["trial 0"], rows["trial 1"]
    assert sigterm["signal"] == "SIGTERM" and sigterm["exit codes"] == "143, 0"
    assert sigkill["signal"] == "SIGKILL" and sigkill["exit codes"] == "-9, 0"
    for row in (sigterm, sigkill):
        assert row["final step"] == PLAN.max_steps
        assert row["samples per epoch match"] == "yes"
        assert row["max abs Δw vs reference (resume point / end)"].endswith("/ 0"), row
    assert not _failures(rows, ["reference", "trial 0", "trial 1"])


@pytest.mark.slow
def test_a_second_run_in_a_busy_folder_is_refused_and_another_batch_size_mid_epoch_finishes_the_epoch(rows):
    concurrent, mid_epoch = rows["concurrent run"], rows["batch size 4 -> 8, mid-epoch"]
    assert concurrent["exit codes"].startswith("first 0, second 2 after"), concurrent
    assert mid_epoch["exit codes"] == "0", mid_epoch
    assert not _failures(rows, ["concurrent run", "batch size 4 -> 8, mid-epoch"])


@pytest.mark.slow
@pytest.mark.parametrize("case", EPOCH_END_CASES)
def test_resumes_from_a_checkpoint_at_an_epoch_end(rows, case):
    assert rows[case]["outcome"] == "pass", rows[case]["notes"]
