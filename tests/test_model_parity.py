"""Exact parity with numbers produced by the official JAX code (tests/data/official-tiny).

The fixture's tiny model is loaded through the converter (from the official Orbax checkpoint and
from the npz), then losses, per-token NLL, per-chunk losses, the fast weights after every chunk
and the outer gradient of every parameter are compared. Tolerances are the fixture's own
(an exact fp32 re-implementation reaches them; mistakes like rotate-half RoPE, no inner clip or
no gradient through the KV caches miss them by orders of magnitude).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import assert_close
from tttlm import TTTForCausalLM
from tttlm.convert import convert_official, infer_config, to_official

FIXTURE = Path(__file__).parent / "data" / "official-tiny"
LOSS_ATOL = 2e-5
NLL_ATOL = 1e-4
GRAD_REL = 1e-4
FAST_REL = 1e-5


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "parity.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module", params=["orbax", "npz"])
def model(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> TTTForCausalLM:
    pytest.importorskip("tensorstore") if request.param == "orbax" else None
    src = FIXTURE / "orbax" if request.param == "orbax" else FIXTURE / "parity.npz"
    dst = tmp_path_factory.mktemp(f"converted-{request.param}")
    convert_official(src, dst, window=64, chunk_size=32, rope_theta=10000.0, bos_token_id=1)
    return TTTForCausalLM.from_pretrained(dst)


def batch(ref: dict[str, np.ndarray], official_mask: bool) -> dict[str, torch.Tensor]:
    mask = ref["input/loss_masks_official" if official_mask else "input/loss_masks"]
    return dict(input_ids=torch.from_numpy(ref["input/input_ids"]).long()[None],
                labels=torch.from_numpy(ref["input/target_tokens"]).long()[None],
                loss_mask=torch.from_numpy(mask)[None])


def test_config_inferred_from_checkpoint(model: TTTForCausalLM) -> None:
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_heads, c.num_layers) == (256, 64, 4, 4)
    assert (c.intermediate_size, c.num_ttt_layers, c.window, c.chunk_size) == (128, 2, 64, 32)


@pytest.mark.parametrize("official_mask", [False, True], ids=["mask-ones", "mask-official"])
def test_meta_forward_matches_official(model: TTTForCausalLM, ref: dict[str, np.ndarray],
                                       official_mask: bool) -> None:
    prefix = "officialmask/meta/" if official_mask else "meta/"
    with torch.no_grad():
        out = model(**batch(ref, official_mask), ttt=True)
    assert_close(out.loss, ref[prefix + "loss"], atol=LOSS_ATOL, name="meta loss")
    assert_close(out.token_nll[0], ref[prefix + "token_nll"], atol=NLL_ATOL, name="token nll")
    assert_close(out.chunk_losses[0], ref[prefix + "chunk_loss"], atol=LOSS_ATOL, name="chunks")


@pytest.mark.parametrize("official_mask", [False, True], ids=["mask-ones", "mask-official"])
def test_pretrain_forward_matches_official(model: TTTForCausalLM, ref: dict[str, np.ndarray],
                                           official_mask: bool) -> None:
    prefix = "officialmask/pretrain/" if official_mask else "pretrain/"
    with torch.no_grad():
        out = model(**batch(ref, official_mask), ttt=False)
    assert_close(out.loss, ref[prefix + "loss"], atol=LOSS_ATOL, name="pretrain loss")
    if not official_mask:
        assert_close(out.token_nll[0], ref["pretrain/token_nll"], atol=NLL_ATOL, name="nll")
        assert_close(out.chunk_losses[0], ref["pretrain/chunk_loss"], atol=LOSS_ATOL, name="chunks")


def test_unperturbed_norms(model: TTTForCausalLM, ref: dict[str, np.ndarray]) -> None:
    plain = TTTForCausalLM(model.config)
    state = model.state_dict()
    plain.load_state_dict({k: torch.ones_like(v) if "norm" in k else v for k, v in state.items()})
    with torch.no_grad():
        meta = plain(**batch(ref, False), ttt=True)
        pre = plain(**batch(ref, False), ttt=False)
    assert_close(meta.loss, ref["unperturbed/meta/loss"], atol=LOSS_ATOL, name="meta")
    assert_close(meta.token_nll[0], ref["unperturbed/meta/token_nll"], atol=NLL_ATOL, name="nll")
    assert_close(pre.loss, ref["unperturbed/pretrain/loss"], atol=LOSS_ATOL, name="pretrain")


def test_fast_weights_after_every_chunk(model: TTTForCausalLM, ref: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        out = model(**batch(ref, False), ttt=True, return_fast_weights=True)
    assert out.fast_weights is not None and len(out.fast_weights) == 8
    first = model.config.num_prefix_layers
    for c, fast in enumerate(out.fast_weights):
        for w in ("w1", "w2", "w3"):
            ours = np.stack([fast[f"layers.{first + j}.prime.{w}.weight"][0].T.numpy()
                             for j in range(model.config.num_ttt_layers)])
            assert_close(ours, ref[f"inner/prime_after_chunk/{w}"][c], rel_l2=FAST_REL,
                         name=f"chunk {c} {w}")
    assert_close(out.inner_update_norms[0], ref["inner/update_norm_per_chunk"], atol=1e-5,
                 name="update norms")


@pytest.mark.parametrize("mode", ["meta", "pretrain"])
def test_outer_gradient_of_every_parameter(model: TTTForCausalLM, ref: dict[str, np.ndarray],
                                           mode: str) -> None:
    model.zero_grad(set_to_none=True)
    out = model(**batch(ref, False), ttt=mode == "meta")
    out.loss.backward()
    grads = to_official({k: p.grad for k, p in model.named_parameters()}, model.config)
    model.zero_grad(set_to_none=True)
    key = "grad/" if mode == "meta" else "grad_pretrain/"
    expected = {k[len(key):]: v for k, v in ref.items() if k.startswith(key)}
    assert set(grads) == set(expected)
    for name, g in grads.items():
        assert_close(g, expected[name], rel_l2=GRAD_REL, name=name)


def test_checkpointed_gradients_match_official(model: TTTForCausalLM,
                                               ref: dict[str, np.ndarray]) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch(ref, False), ttt=True, checkpoint_chunks=True).loss.backward()
    grads = to_official({k: p.grad for k, p in model.named_parameters()}, model.config)
    model.zero_grad(set_to_none=True)
    for name, g in grads.items():
        assert_close(g, ref["grad/" + name], rel_l2=GRAD_REL, name=name)


def test_infer_config_roundtrip(ref: dict[str, np.ndarray]) -> None:
    params = {k: v for k, v in ref.items() if "/" not in k}
    config = infer_config(params, window=64, chunk_size=32, rope_theta=10000.0, bos_token_id=1)
    assert config.num_prefix_layers == 2
