"""CPUDropout: torch's CPU dropout numerics with a cheaper mask (medclip_train/model/dropout.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medclip_train.model.dropout import CPUDropout, dropout_noise, keep_mask, use_cpu_dropout


@pytest.mark.parametrize("keep", [0.9, 0.75, 0.7, 0.5, 0.137])
def test_each_element_is_kept_with_the_exact_probability(keep):
    n = 4_000_000
    torch.manual_seed(0)
    kept = keep_mask(n, keep).mean()
    sigma = math.sqrt(keep * (1 - keep) / n)
    # Without the tie draw 0.9 would give 230/256 = 0.8984 (7 sigma off here), 0.7 179/256 = 0.6992 (3.4 sigma).
    assert abs(kept - keep) < 3 * sigma, (kept, keep, sigma)


def test_the_tie_draw_decides_the_threshold_byte():
    # keep = 230.5 / 256: the byte 230 (1 in 256) is kept half the time, bytes below always, above never.
    keep = 230.5 / 256
    gen = torch.Generator().manual_seed(3)
    words = torch.empty((1_000_000 + 7) // 8, dtype=torch.int64).random_(-(2**63), 2**63 - 1, generator=gen)
    bytes_ = words.numpy().view("uint8")[:1_000_000]
    mask = keep_mask(1_000_000, keep, torch.Generator().manual_seed(3))
    assert mask[bytes_ < 230].all() and not mask[bytes_ > 230].any()
    ties = mask[bytes_ == 230]
    assert 0.4 < ties.mean() < 0.6 and len(ties) > 3000


def test_masks_follow_torch_seed_and_generator():
    torch.manual_seed(5)
    a = keep_mask(10_000, 0.9)
    torch.manual_seed(5)
    b = keep_mask(10_000, 0.9)
    c = keep_mask(10_000, 0.9)
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_kept_values_and_gradients_are_those_of_torch_dropout(dtype, p):
    torch.manual_seed(0)
    x = (torch.randn(64, 75, 48) * 3).to(dtype)
    x[x == 0] = 1
    # torch's own CPU dropout: the value it gives a kept element is the reference.
    ref = F.dropout(x, p, training=True)
    ref_kept = ref != 0
    module = CPUDropout(p).train()
    xs = x.clone().requires_grad_(True)
    out = module(xs)
    kept = out != 0
    assert 0.5 < kept.float().mean().item() / (1 - p) < 1.5
    both = ref_kept & kept
    assert both.any()
    assert torch.equal(out[both], ref[both])
    assert not out[~kept].any()
    # Backward: grad * noise, the same noise tensor (dtype-rounded 1/keep), as autograd of x * noise in torch.
    grad = torch.randn_like(out)
    out.backward(grad)
    noise = dropout_noise(kept.numpy().reshape(-1), 1 - p, dtype).view(x.shape)
    assert torch.equal(xs.grad, grad * noise)


def test_eval_mode_p0_and_inplace_are_torch_dropout():
    x = torch.randn(8, 16)
    assert torch.equal(CPUDropout(0.5).eval()(x), x)
    assert torch.equal(CPUDropout(0.0).train()(x), x)
    torch.manual_seed(0)
    ref = F.dropout(x.clone(), 0.5, training=True, inplace=True)
    torch.manual_seed(0)
    assert torch.equal(CPUDropout(0.5, inplace=True).train()(x.clone()), ref)


def test_use_cpu_dropout_swaps_only_active_dropouts_and_keeps_the_state_dict():
    nn = torch.nn
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Dropout(0.0), nn.Linear(4, 4), nn.Dropout(1.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_cpu_dropout(model) == 1
    assert [type(m).__name__ for m in model] == ["Linear", "CPUDropout", "Dropout", "Linear", "Dropout"]
    assert model[1].p == 0.1
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _qkv(dtype, shape=(6, 4, 19, 16)):
    torch.manual_seed(0)
    return [torch.randn(shape).to(dtype).requires_grad_() for _ in range(3)]


def _padding_mask(batch=6, length=19):
    keep = torch.ones(batch, 1, length, length, dtype=torch.bool)
    keep[0, ..., 11:] = False
    keep[3, ..., 4:] = False
    return keep


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("float_mask", [False, True])
def test_math_attention_is_torchs_math_kernel_bit_for_bit(autocast, float_mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from medclip_train.model.dropout import math_attention

    q, k, v = _qkv(torch.bfloat16 if autocast else torch.float32)
    mask = _padding_mask()
    if float_mask:
        mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        out = math_attention(q, k, v, mask, scale=0.3)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    grad = torch.randn_like(ref)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert torch.equal(ours, theirs)


def test_math_attention_drops_probabilities_as_torchs_kernel_with_the_same_mask():
    from medclip_train.model.dropout import math_attention

    q, k, v = _qkv(torch.float32)
    mask, p = _padding_mask(), 0.25
    torch.manual_seed(7)
    out = math_attention(q, k, v, mask, dropout_p=p, scale=0.3)
    torch.manual_seed(7)
    kept = torch.from_numpy(keep_mask(6 * 4 * 19 * 19, 1 - p)).view(6, 4, 19, 19)
    # torch's math kernel takes an explicit dropout mask (for testing its fused kernels); it scales v instead of the
    # probabilities, so the two agree to rounding.
    float_mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))  # what F.sdpa passes it for a bool mask
    ref, _ = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, float_mask, p, False, kept, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, math_attention(q, k, v, mask, scale=0.3), atol=1e-3)


def _tiny_bert(attention_dropout):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=attention_dropout,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return BertModel(config)


def test_a_bert_tower_uses_it_in_training_with_its_padding_mask():
    import copy

    from medclip_train.model.dropout import CPU_SDPA

    # A dropout rate so small that no probability is dropped and 1 / (1 - p) is 1.0 in fp32: the tower must then
    # give what transformers' own sdpa gives without dropout, padding mask included (a dropped mask changes rows
    # 0 and 3 by far more than the tolerance).
    bert = _tiny_bert(attention_dropout=1e-9).train()
    reference = copy.deepcopy(bert).eval()
    assert use_cpu_dropout(bert) == 3  # the two attention layers' dropout modules and the tower
    assert bert.config._attn_implementation == CPU_SDPA
    ids = torch.randint(1, 64, (5, 13))
    attention = torch.ones_like(ids)
    attention[0, 7:] = 0
    attention[3, 2:] = 0
    out = bert(input_ids=ids, attention_mask=attention).last_hidden_state
    ref = reference(input_ids=ids, attention_mask=attention).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    bert.config.attention_probs_dropout_prob = 0.5
    for layer in bert.encoder.layer:
        layer.attention.self.dropout.p = 0.5
    assert not torch.allclose(bert(input_ids=ids, attention_mask=attention).last_hidden_state, ref, atol=1e-2)
