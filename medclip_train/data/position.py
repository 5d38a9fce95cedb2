"""The stream position a checkpoint holds (the data module's state): read across an epoch's end, and the refusal
when a resume would count it in another layout.

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


def mid_epoch_message(name: str, before, now, state: dict) -> str:
    data = state["data"]
    return (
        f"{name}: the checkpoint stopped in the middle of epoch {data.get('epoch', 0)} "
        f"({data.get('samples_in_epoch', '?')} samples trained on) with {name}={before!r}; this run has {now!r}, "
        f"which cannot continue that epoch exactly (each worker's share of the epoch depends on it). Resume with "
        f"{name}={before!r} and change it at an epoch boundary"
    )
