"""The streaming pipeline: exact epochs over ranks x workers, resampled weights, bad samples, resume."""

from __future__ import annotations

import collections

import pytest
import torch

from medclip_train.config import ModelConfig
from medclip_train.data.datamodule import WebDataModule
from medclip_train.data.plan import consumed_per_worker
from medclip_train.data.sources import ShardSource
from medclip_train.data.stream import DataError
from tests.shardkit import make_shards, shard_pattern

PREPROCESS = {
    "size": 32,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bilinear",
    "resize_mode": "shortest",
}


def make_dm(tokenizer, train, **kwargs) -> WebDataModule:
    dm = WebDataModule(train=train, **{"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, **kwargs})
    dm.connect(tokenizer, PREPROCESS)
    return dm


def keys_of(loader) -> list[list[str]]:
    return [batch["key"] for batch in loader]


@pytest.mark.parametrize("total_shards", [[7, 3, 11, 5], [8, 8]])
def test_exact_epoch_two_ranks_two_workers_sees_every_key_once(tmp_path, tokenizer, total_shards):
    paths = make_shards(tmp_path, total_shards)
    n = sum(total_shards)
    dm = make_dm(tokenizer, shard_pattern(paths), num_workers=2)
    per_rank, shapes = [], []
    for rank in range(2):
        loader = dm.train_dataloader()
        loader.world = (rank, 2)
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append([k for b in batches for k in b["key"]])
        shapes.append([len(b["key"]) for b in batches])
    assert shapes[0] == shapes[1], "every rank must run the same batches (DDP would hang otherwise)"
    seen = collections.Counter(per_rank[0] + per_rank[1])
    assert set(seen) == {f"train_{i:06d}" for i in range(n)}
    # DistributedSampler-style padding: only when 2 does not divide N, and then one sample twice.
    assert sum(seen.values()) - n == (n % 2 and 2 - n % 2)
    assert not set(per_rank[0]) & set(per_rank[1]) or n % 2


def test_exact_epochs_reshuffle_with_agreed_seed(tmp_path, tokenizer):
    paths = make_shards(tmp_path, [6, 6, 6, 6])
    dm = make_dm(tokenizer, shard_pattern(paths))
    first = keys_of(dm.train_dataloader())
    for batch in first:  # as the training step reports them
        dm.on_train_batch_consumed(len(batch))
    dm.on_train_epoch_done()
    second = keys_of(dm.train_dataloader())
    assert sorted(sum(first, [])) == sorted(sum(second, []))
    assert first != second
    again = make_dm(tokenizer, shard_pattern(paths))
    assert keys_of(again.train_dataloader()) == first, "same seed and epoch -> same order on every rank"


def test_resampled_mode_follows_source_weights(tmp_path, tokenizer):
    a = make_shards(tmp_path / "a", [10, 10], seed=1, key_prefix="a")
    b = make_shards(tmp_path / "b", [20], seed=2, key_prefix="b")
    dm = make_dm(
        tokenizer,
        [ShardSource(shard_pattern(a), weight=1.0, name="a"), ShardSource(shard_pattern(b), weight=3.0, name="b")],
        epoch_mode="resampled",
        samples_per_epoch=800,
        batch_size=8,
        shuffle_buffer=0,
    )
    loader = dm.train_dataloader()
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == 800 and len(loader) == 100
    from_b = sum(k.startswith("b_") for k in keys)
    # Expected 3 / (1 + 3) = 0.75; 40 shard draws of 20 samples, so allow a few draws of noise.
    assert 0.6 < from_b / len(keys) < 0.9


def test_bad_samples_are_skipped_counted_and_batches_keep_their_shape(tmp_path, tokenizer):
    faults = {1: "bad_jpeg", 5: "garbage", 9: "empty_caption", 13: "non_utf8", 17: "no_text"}
    paths = make_shards(tmp_path, [12, 12], corrupt=faults)
    dm = make_dm(tokenizer, shard_pattern(paths), max_skip_fraction=0.5)
    batches = list(dm.train_dataloader())
    assert [len(b["key"]) for b in batches] == [4] * 6
    assert sum(int(b["skipped"]) for b in batches) == len(faults)
    bad = {f"train_{i:06d}" for i in faults}
    assert not bad & {k for b in batches for k in b["key"]}


def test_truncated_shard_is_counted_and_training_goes_on(tmp_path, tokenizer):
    paths = make_shards(tmp_path, [12, 12])
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # cut the tar in the middle of a member
    dm = make_dm(tokenizer, shard_pattern(paths), max_skip_fraction=0.9, shuffle_buffer=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 6 and all(len(b["key"]) == 4 for b in batches)
    # half of the second shard is gone: about six of its twelve samples are lost and counted
    assert 4 <= sum(int(b["skipped"]) for b in batches) <= 7


def test_too_many_bad_samples_stop_with_the_shard_named(tmp_path, tokenizer):
    paths = make_shards(tmp_path, [30], corrupt={i: "garbage" for i in range(0, 30, 2)})
    dm = make_dm(tokenizer, shard_pattern(paths), max_skip_fraction=0.1, shuffle_buffer=0)
    dm.train_dataloader().dataset.spec.min_samples_for_skip_check = 10
    loader = dm.train_dataloader()
    loader.dataset.spec.min_samples_for_skip_check = 10
    with pytest.raises(DataError, match="train-000000.tar"):
        list(loader)


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_resume_continues_the_stream(tmp_path, tokenizer, mode):
    paths = make_shards(tmp_path, [9, 9, 9, 9])
    kwargs = {"num_workers": 2, "epoch_mode": mode}
    if mode == "resampled":
        kwargs["samples_per_epoch"] = 40
    dm = make_dm(tokenizer, shard_pattern(paths), **kwargs)
    full = keys_of(dm.train_dataloader())
    consumed = 3
    for _ in range(consumed):
        dm.on_train_batch_consumed(dm.batch_size)
    state = dm.state_dict()

    resumed = make_dm(tokenizer, shard_pattern(paths), **kwargs)
    resumed.load_state_dict(state)
    rest = keys_of(resumed.train_dataloader())
    assert len(full) - consumed == len(rest)
    if mode == "exact":
        # The same remaining batches, sample for sample; the new DataLoader may start its round-robin over the
        # workers at another worker, so the order of whole batches can differ.
        assert sorted(rest) == sorted(full[consumed:])
    else:
        assert rest != full[consumed:], "resampled mode draws fresh samples instead of replaying"


def test_consumed_per_worker_follows_dataloader_round_robin():
    assert consumed_per_worker([2, 3], 5) == [2, 3]
    assert consumed_per_worker([2, 3], 3) == [2, 1]
    assert consumed_per_worker([1, 3], 3) == [1, 2]


def test_missing_sizes_json_in_exact_mode_names_the_file(tmp_path):
    paths = make_shards(tmp_path, [4])
    (tmp_path / "sizes.json").unlink()
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        WebDataModule(train=shard_pattern(paths))


def test_missing_shard_is_named(tmp_path):
    make_shards(tmp_path, [4])
    with pytest.raises(FileNotFoundError, match="train-000001.tar"):
        WebDataModule(train=str(tmp_path / "train-{000000..000001}.tar"))


def test_labels_vocabulary_from_manifest(tmp_path, tokenizer):
    paths = make_shards(tmp_path, [16])
    dm = make_dm(tokenizer, shard_pattern(paths), label_top_k=3)
    assert len(dm.vocab) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == (4, 3)
    assert torch.all(batch["labels"].sum(dim=1) >= 1)


def test_trimmed_text_batches_are_contiguous(tmp_path, tokenizer):
    """Trailing pads are cut from the token ids; the result must be a dense tensor, not a strided view, or pinning
    it for the device copies it through a temporary first."""
    dm = make_dm(tokenizer, shard_pattern(make_shards(tmp_path, [8])))
    batches = list(dm.train_dataloader())
    assert any(b["text"].shape[1] < tokenizer.context_length for b in batches), "no batch was trimmed"
    assert all(b["text"].is_contiguous() for b in batches)


def test_the_shuffle_buffer_yields_before_it_is_full_and_keeps_every_sample(tokenizer):
    """An epoch starts after ``shuffle_initial`` raw samples, not after a full buffer (5000 per worker in the
    pretraining config); the output is still a permutation of the input, fixed by the seed."""
    from medclip_train.data.stream import StreamSpec, _SampleReader

    spec = StreamSpec(
        urls=[],
        sizes=None,
        source_of_shard=[],
        source_weights=[],
        batch_size=4,
        transform=None,
        tokenizer=tokenizer,
        image_size=32,
        shuffle_buffer=1000,
        shuffle_initial=50,
    )
    pulled = []

    def source():
        for i in range(3000):
            pulled.append(i)
            yield i

    out = _SampleReader(spec, worker_id=0)._shuffle(source())
    first = next(out)
    assert len(pulled) <= 51, f"{len(pulled)} samples read before the first was yielded"
    rest = [first, *out]
    assert sorted(rest) == list(range(3000))
    again = list(_SampleReader(spec, worker_id=0)._shuffle(iter(range(3000))))
    assert again == rest and rest != list(range(3000))


def train_part(dm: WebDataModule, rank: int, world: int, batches: int | None) -> list[str]:
    """Rank ``rank`` of ``world`` trains on ``batches`` batches of its loader (None: to the epoch's end), as the
    trainer would: each batch counted by the data module before its step. Returns the keys trained on."""
    dm.world = (rank, world)
    loader = dm.train_dataloader()
    keys, it = [], iter(loader)
    for batch in it if batches is None else (next(it) for _ in range(batches)):
        dm.on_train_batch_consumed(len(batch["key"]))
        keys += batch["key"]
    return keys


def run_parts(tmp_path, tokenizer, sizes, parts) -> tuple[list[str], int]:
    """One exact epoch trained in ``parts``, each ``(world, data-module options, batches per rank or None)``, every
    part resumed from rank 0's state of the one before (what rank 0 writes in the checkpoint). Returns every key
    trained on by every rank, and the number of samples."""
    pattern = shard_pattern(make_shards(tmp_path, sizes))
    keys, state = [], None
    for world, options, batches in parts:
        for rank in range(world):
            dm = make_dm(tokenizer, pattern, **options)
            dm.world = (rank, world)
            if state is not None:
                dm.load_state_dict(state)
            keys += train_part(dm, rank, world, batches)
            if batches is not None:
                # Lightning counts the earlier parts' batches in its own epoch progress; len() must cover them.
                assert len(dm._train_loader) >= dm.stream_state["batches_in_epoch"]
            if rank == 0:
                rank0_state = dm.state_dict()
        state = rank0_state
    return keys, sum(sizes)


ELASTIC = {
    # 32 samples, batches of 4: 2 ranks x 2 workers train 2 batches each, 1 rank x 1 worker the other 16.
    "2x2 -> 1x1": [(2, {"num_workers": 2}, 2), (1, {"num_workers": 1}, None)],
    # 1 rank x 2 workers trains 3 batches; 2 ranks x 1 worker the 20 left.
    "1x2 -> 2x1": [(1, {"num_workers": 2}, 3), (2, {"num_workers": 1}, None)],
    # Batch size, workers and shuffle buffer changed too, twice within the epoch.
    "2x2 -> 1x3 -> 2x1": [
        (2, {"num_workers": 2}, 1),
        (1, {"num_workers": 3, "batch_size": 2, "shuffle_buffer": 4}, 3),
        (2, {"num_workers": 1, "batch_size": 3}, None),
    ],
}


@pytest.mark.parametrize("parts", ELASTIC.values(), ids=ELASTIC.keys())
def test_elastic_resume_trains_every_sample_of_the_epoch_once(tmp_path, tokenizer, parts):
    keys, n = run_parts(tmp_path, tokenizer, [9, 7, 8, 8], parts)
    assert collections.Counter(keys) == {f"train_{i:06d}": 1 for i in range(n)}


def test_elastic_resume_pads_like_the_plan_when_the_ranks_do_not_divide_the_epoch(tmp_path, tokenizer):
    """27 samples on 2 ranks: the first part's plan repeats one sample (DistributedSampler-style padding), the
    rest on 1 rank repeats none."""
    keys, n = run_parts(tmp_path, tokenizer, [7, 3, 12, 5], ELASTIC["2x2 -> 1x1"])
    seen = collections.Counter(keys)
    assert set(seen) == {f"train_{i:06d}" for i in range(n)} and sum(seen.values()) - n <= 1


def test_a_mid_epoch_position_of_an_older_plan_is_refused(tmp_path, tokenizer):
    """Checkpoints of plan 1 (one generator for the shuffle buffer and the caption draws) cannot tell which
    samples they delivered; at an epoch's end they still load."""
    pattern = shard_pattern(make_shards(tmp_path, [8, 8]))
    dm = make_dm(tokenizer, pattern)
    dm.on_train_batch_consumed(4)
    state = {k: v for k, v in dm.state_dict().items() if k != "plan"}
    with pytest.raises(ValueError, match=r"middle of epoch 0 .*older medclip-train"):
        make_dm(tokenizer, pattern).load_state_dict(state)
    make_dm(tokenizer, pattern).load_state_dict({**state, "batches_in_epoch": 0, "samples_in_epoch": 0})


def test_a_local_glob_names_the_shards_in_order(tmp_path):
    paths = make_shards(tmp_path, [3, 3, 3])
    dm = WebDataModule(train=str(tmp_path / "train-*.tar"), batch_size=4, num_workers=0)
    assert dm._train_urls == [str(p) for p in paths] and dm._train_sizes == [3, 3, 3]
    with pytest.raises(ValueError, match="matches no shard"):
        WebDataModule(train=str(tmp_path / "val-*.tar"), batch_size=4, num_workers=0)


def test_the_length_of_an_epoch_leaves_the_stream_spec_as_it_is(tmp_path, tokenizer):
    """``len(loader)`` is asked by Lightning at any time; it used to write the world into the workers' spec."""
    dm = make_dm(tokenizer, shard_pattern(make_shards(tmp_path, [8, 8])))
    loader = dm.train_dataloader()
    loader.world = (1, 2)
    assert len(loader) == 2  # 16 samples over 2 ranks in batches of 4
    assert loader.dataset.spec.world == (0, 1)


def test_the_length_after_an_elastic_resume_leaves_the_stream_spec_as_it_is(tmp_path, tokenizer):
    """16 samples: 2 ranks x 2 workers train one batch of 4 each, then 1 rank goes on with the 8 left: Lightning's
    count (1 batch) plus 2 batches; asking for it must not write the epoch's parts into the workers' spec."""
    pattern = shard_pattern(make_shards(tmp_path, [8, 8]))
    first = make_dm(tokenizer, pattern, num_workers=2)
    train_part(first, 0, 2, 1)
    resumed = make_dm(tokenizer, pattern)
    resumed.load_state_dict(first.state_dict())
    loader = resumed.train_dataloader()
    assert len(loader) == 3
    assert (loader.dataset.spec.epoch, loader.dataset.spec.parts) == (0, [])


def test_the_data_module_keeps_its_position_in_a_plain_trainer(tmp_path, tiny_tokenizer_dir):
    """No CLI: the data module adds its own StreamPosition callback; the module calls nothing on it. 16 samples in
    batches of 4 are 4 batches an epoch, so 5 steps are a whole epoch and one batch of the next."""
    from medclip_train.data.datamodule import StreamPosition
    from medclip_train.module import CLIPModule
    from tests.training.conftest import bare_trainer

    module = CLIPModule(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)))
    dm = WebDataModule(train=shard_pattern(make_shards(tmp_path, [8, 8])), batch_size=4, num_workers=0)
    dm.connect(module.tokenizer, module.preprocess_cfg)
    trainer = bare_trainer(max_steps=5)
    trainer.fit(module, datamodule=dm)
    assert [c.data for c in trainer.callbacks if isinstance(c, StreamPosition)] == [dm]
    position = {"epoch": 1, "batches_in_epoch": 1, "samples_in_epoch": 4, "samples_in_epoch_all_ranks": 4}
    assert dm.stream_state == {**position, "restarts": 0, "parts": []}


def _val_pixels(tokenizer, pattern, workers, hold: bool):
    """The validation epoch's pixels by key (a deterministic transform, so any worker layout gives the same), the
    shared-memory inode of each batch's pixels, and the loader."""
    import os

    dm = make_dm(tokenizer, pattern, val=pattern, num_workers=workers, prefetch_factor=2)
    loader = dm.val_dataloader()
    loader.world = (0, 1)
    pixels, inodes, held = {}, [], []
    for batch in loader:
        if workers:
            fd, _ = batch["image"].untyped_storage()._share_fd_cpu_()  # the block the worker sent it in
            inodes.append(os.fstat(fd).st_ino)
        if hold:
            held.append(batch)
        else:
            pixels.update({key: image.clone() for key, image in zip(batch["key"], batch["image"])})
        del batch
    for batch in held:  # read only now: a block reused while held would show another batch's pixels
        pixels.update({key: image.clone() for key, image in zip(batch["key"], batch["image"])})
    return pixels, inodes, loader


@pytest.mark.parametrize("hold", [False, True])
def test_workers_reuse_pixel_blocks_the_main_process_dropped_and_never_one_it_holds(tmp_path, tokenizer, hold):
    pattern = shard_pattern(make_shards(tmp_path, [48, 48]))
    reference, _, _ = _val_pixels(tokenizer, pattern, workers=0, hold=False)
    pixels, inodes, loader = _val_pixels(tokenizer, pattern, workers=2, hold=hold)
    assert pixels.keys() == reference.keys() and len(reference) == 96
    assert all(torch.equal(pixels[key], reference[key]) for key in reference)
    slots = loader.dataset.spec.pixel_slots.busy.shape[1]
    assert len(inodes) == 24 > 2 * slots
    if hold:  # every batch is still held: no block may be reused
        assert len(set(inodes)) == len(inodes)
    else:  # dropped batches: the workers cycle through their slots
        assert len(set(inodes)) <= 2 * slots


@pytest.mark.parametrize(("priority", "policy"), [("idle", "SCHED_IDLE"), ("normal", "SCHED_OTHER"), ("auto", None)])
def test_loader_workers_run_at_the_scheduling_class_asked(tmp_path, tokenizer, priority, policy):
    import os

    pattern = shard_pattern(make_shards(tmp_path, [8]))
    loader = make_dm(tokenizer, pattern, num_workers=1, worker_priority=priority).train_dataloader()
    loader.world = (0, 1)
    before = _children()
    batches = iter(loader)
    next(batches)  # the worker has run its init
    (worker,) = _children() - before
    # auto: idle on a machine without CUDA (this one), where the workers share the cores with the training threads.
    expected = policy or ("SCHED_OTHER" if torch.cuda.is_available() else "SCHED_IDLE")
    assert os.sched_getscheduler(worker) == getattr(os, expected)
    del batches


def _children() -> set[int]:
    from pathlib import Path

    tasks = Path("/proc/self/task").iterdir()
    return {int(pid) for task in tasks for pid in (task / "children").read_text().split()}


def test_an_unknown_worker_priority_is_one_line_naming_the_flag(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="data.worker_priority must be 'auto', 'idle' or 'normal', got 'low'"):
        WebDataModule(train="x-{000000..000001}.tar", worker_priority="low")


def _val_batches(tokenizer, pattern, workers):
    dm = make_dm(tokenizer, pattern, val=pattern, num_workers=workers, label_top_k=3)
    loader = dm.val_dataloader()
    loader.world = (0, 1)
    return list(loader), loader.dataset.spec.pad_token_id


def test_a_worker_batch_sends_only_its_pixels_through_shared_memory(tmp_path, tokenizer):
    """Each shared-memory tensor of a batch costs the worker a new block and the main process a socket connection;
    the token ids and labels (a few KB) come inside the batch's pickle and the counters as ints. The values must be
    those of the same loader without workers."""
    pattern = shard_pattern(make_shards(tmp_path, [12, 12]))
    reference, pad = _val_batches(tokenizer, pattern, workers=0)
    batches, _ = _val_batches(tokenizer, pattern, workers=2)
    for batch in batches:
        assert batch["image"].is_shared()
        assert type(batch["text"]) is torch.Tensor and not batch["text"].is_shared()
        assert type(batch["labels"]) is torch.Tensor and not batch["labels"].is_shared()
        assert all(type(batch[k]) is int for k in ("skipped", "read_retries", "captions_at_context"))

    def by_key(batches):  # the token ids padded back to the context: batches are trimmed to their longest caption
        return {
            key: (torch.nn.functional.pad(text, (0, tokenizer.context_length - len(text)), value=pad), labels)
            for b in batches
            for key, text, labels in zip(b["key"], b["text"], b["labels"])
        }

    ours, expected = by_key(batches), by_key(reference)
    assert ours.keys() == expected.keys() and len(expected) == 24
    for key, (text, labels) in expected.items():
        assert torch.equal(ours[key][0], text) and torch.equal(ours[key][1], labels), key
