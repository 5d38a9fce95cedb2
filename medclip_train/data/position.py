"""The stream position a checkpoint holds (the data module's state): read across an epoch's end, and the refusal
of a position counted in an older epoch plan.

Shared by :class:`~medclip_train.data.datamodule.WebDataModule` (which restores it) and :mod:`medclip_train.resume`
(which checks a resume before the model is built), so it lives in the data layer below both.
"""

from __future__ import annotations


def finished_epoch_moved_on(state: dict) -> dict:
    """The data state with a fully consumed epoch (batches_in_epoch == batches_planned) as the start of the next."""
    planned = state.get("batches_planned")
    if planned and state.get("batches_in_epoch", 0) >= planned:
        state = {**state, "epoch": state.get("epoch", 0) + 1, "batches_in_epoch": 0, "samples_in_epoch": 0}
    return state


PLAN_VERSION = 2
"""Version of the epoch plan a checkpoint's position is counted in. 2: the shuffle buffer has its own generator
(data/plan.py order_rng), so the samples each worker delivered can be recomputed for an elastic resume."""


def old_plan_message(state: dict) -> str:
    return (
        f"the checkpoint stopped in the middle of epoch {state.get('epoch', 0)} ({state.get('batches_in_epoch')} "
        f"batches trained on) and was written by an older medclip-train whose shuffle order this version cannot "
        f"replay, so it cannot tell which samples are left; finish that epoch with the version that wrote it, or "
        f"resume from a checkpoint at an epoch's end"
    )
