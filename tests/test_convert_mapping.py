"""Official checkpoint conversion: Orbax reading, name/layout mapping, config inference, CLI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tttlm.cli import main
from tttlm.config import TTTConfig, Variant
from tttlm.convert import cli as convert_cli
from tttlm.convert.official import (
    convert_official,
    from_official,
    infer_config,
    load_official_arrays,
    official_name_of,
    official_shapes,
    to_official,
)
from tttlm.convert.orbax import read_orbax
from tttlm.model import TTTForCausalLM

FIXTURE = Path(__file__).parent / "data" / "official-tiny"
ORBAX = FIXTURE / "orbax"
P = "language_model.model."


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_bitwise(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert np.array_equal(bits(a[name]), bits(b[name])), name


@pytest.fixture(scope="module")
def npz() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "parity.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def params(npz: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in npz.items() if "/" not in k}


@pytest.fixture(scope="module")
def config(params: dict[str, np.ndarray]) -> TTTConfig:
    return infer_config(params, window=64, chunk_size=32, rope_theta=10000.0, bos_token_id=1)


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ orbax reading
@pytest.mark.parametrize("where", ["", "0", "0/model_weights"])
def test_read_orbax_is_bitwise_the_npz(where: str, params: dict[str, np.ndarray]) -> None:
    pytest.importorskip("tensorstore")
    arrays = read_orbax(ORBAX / where)
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert_bitwise(arrays, params)


def _write_zarr3_checkpoint(weights: Path, arrays: dict[str, np.ndarray], *,
                            flag: bool | None) -> None:
    ts = pytest.importorskip("tensorstore")
    weights.mkdir(parents=True)
    tree = {}
    for name, value in arrays.items():
        store = ts.open({"driver": "zarr3",
                         "kvstore": {"driver": "ocdbt", "base": f"file://{weights}/",
                                     "path": f"{name}/"}},
                        create=True, dtype=ts.float32, shape=value.shape).result()
        store.write(value).result()
        keys = name.split(".")
        tree[str(tuple(keys))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in keys],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                               "write_shape": list(value.shape)}}
    tree["('lm_head',)"] = {"key_metadata": [{"key": "lm_head", "key_type": 2}],
                            "value_metadata": {"value_type": "None", "skip_deserialize": True}}
    meta: dict[str, object] = {"tree_metadata": tree}
    if flag is not None:
        meta["use_zarr3"] = flag
    (weights / "_METADATA").write_text(json.dumps(meta))


@pytest.mark.parametrize("flag", [True, None])
def test_read_orbax_zarr3_takes_latest_step(tmp_path: Path, flag: bool | None) -> None:
    old = {"a.weight": np.ones((2, 3), np.float32)}
    new = {"a.weight": np.arange(6, dtype=np.float32).reshape(3, 2), "b.c": np.zeros(4, np.float32)}
    _write_zarr3_checkpoint(tmp_path / "9" / "model_weights", old, flag=flag)
    _write_zarr3_checkpoint(tmp_path / "10" / "model_weights", new, flag=flag)
    (tmp_path / "11.orbax-checkpoint-tmp-3" / "model_weights").mkdir(parents=True)
    assert_bitwise(read_orbax(tmp_path), new)


def test_read_orbax_rejects_other_folders(tmp_path: Path) -> None:
    (tmp_path / "0" / "something").mkdir(parents=True)
    with pytest.raises(ValueError) as err:
        read_orbax(tmp_path)
    message = one_line(err)
    assert "model_weights/_METADATA" in message and str(tmp_path) in message
    with pytest.raises(FileNotFoundError):
        read_orbax(tmp_path / "nope")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError):
        read_orbax(tmp_path / "file.bin")


def test_read_orbax_without_tensorstore_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    with pytest.raises(ImportError, match=r"pip install 'tttlm\[orbax\]'"):
        read_orbax(ORBAX)


def test_load_official_arrays_npz_skips_fixture_extras(params: dict[str, np.ndarray]) -> None:
    assert_bitwise(load_official_arrays(FIXTURE / "parity.npz"), params)


# ----------------------------------------------------------------------------- infer_config
def test_infer_config_on_fixture(config: TTTConfig) -> None:
    assert (config.vocab_size, config.hidden_size, config.num_heads, config.head_dim) == (
        256, 64, 4, 16)
    assert (config.num_layers, config.intermediate_size) == (4, 128)
    assert config.variant is Variant.E2E
    assert (config.num_ttt_layers, config.prime_intermediate_size) == (2, 128)
    assert (config.window, config.chunk_size, config.rope_theta) == (64, 32, 10000.0)
    assert (config.bos_token_id, config.eos_token_id) == (1, 1)
    assert (config.inner_lr, config.inner_clip, config.rms_norm_eps) == (1.0, 1.0, 1e-6)


def _fake_official(config: TTTConfig) -> dict[str, np.ndarray]:
    return {n: np.broadcast_to(np.float32(0), s) for n, s in official_shapes(config).items()}


def test_infer_config_official_defaults() -> None:
    real = TTTConfig.from_preset("125m", "e2e")
    got = infer_config(_fake_official(real))
    assert got.to_dict() == real.to_dict()
    assert (got.bos_token_id, got.eos_token_id, got.window, got.chunk_size) == (
        128000, 128001, 8192, 1024)


def test_infer_config_needs_bos_for_small_vocab(params: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError) as err:
        infer_config(params, window=64, chunk_size=32)
    message = one_line(err)
    assert "--bos-id" in message and "256" in message


def test_infer_config_variant_without_prime() -> None:
    arrays = _fake_official(TTTConfig.from_preset("tiny", "full", vocab_size=128256))
    assert infer_config(arrays, window=64, chunk_size=32).variant is Variant.FULL
    assert infer_config(arrays, window=64, chunk_size=32, variant="swa").variant is Variant.SWA
    with pytest.raises(ValueError) as err:
        infer_config(arrays, window=64, chunk_size=32, variant="e2e")
    assert "prime_storage" in one_line(err)


def test_infer_config_rejects_baseline_variant_for_e2e(params: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError) as err:
        infer_config(params, window=64, chunk_size=32, bos_token_id=1, variant="swa")
    assert "e2e" in one_line(err)


def test_infer_config_names_missing_tensor(params: dict[str, np.ndarray]) -> None:
    arrays = {k: v for k, v in params.items() if k != P + "wte.weight"}
    with pytest.raises(ValueError) as err:
        infer_config(arrays, bos_token_id=1)
    assert P + "wte.weight" in one_line(err)


# ---------------------------------------------------------------------------------- mapping
def test_from_official_layout(params: dict[str, np.ndarray], config: TTTConfig) -> None:
    state = from_official(params, config)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())
    assert set(state) == set(official_name_of(config))
    blocks, prime = P + "h.blocks.", P + "h.prime_storage."
    attn = blocks + "seq_modeling_block."

    def same(local: str, official: np.ndarray) -> bool:
        return np.array_equal(bits(state[local].numpy()), bits(official))

    assert same("embed.weight", params[P + "wte.weight"])
    assert same("norm.weight", params[P + "ln_f.weight"])
    assert same("layers.3.attn.wq.weight", params[attn + "wq.weight"][3].T)
    assert same("layers.0.attn.wo.weight", params[attn + "wo.weight"][0].T)
    assert same("layers.1.attn.k_norm.weight", params[attn + "k_norm.weight"][1])
    assert same("layers.2.attn_post_norm.weight", params[blocks + "seq_post_norm.weight"][2])
    assert same("layers.1.mlp_norm.weight", params[blocks + "ffn_norm.weight"][1])
    assert same("layers.1.mlp.w2.weight", params[blocks + "feed_forward.w2.weight"][1].T)
    assert same("layers.2.prime_norm.weight", params[prime + "ffn_prime_norm.weight"][0])
    assert same("layers.3.prime_post_norm.weight", params[prime + "ffn_prime_post_norm.weight"][1])
    assert same("layers.2.prime.w1.weight", params[prime + "feed_forward_prime.w1.weight"][0].T)
    assert same("layers.3.prime.w2.weight", params[prime + "feed_forward_prime.w2.weight"][1].T)
    assert state["layers.0.mlp.w1.weight"].shape == (128, 64)
    assert not any(k.startswith(("layers.0.prime", "layers.1.prime")) for k in state)


def test_round_trip_is_bit_exact(params: dict[str, np.ndarray], config: TTTConfig) -> None:
    assert_bitwise(to_official(from_official(params, config), config), params)


def test_gradients_map_like_weights(npz: dict[str, np.ndarray], config: TTTConfig) -> None:
    grads = {k[len("grad/"):]: v for k, v in npz.items() if k.startswith("grad/")}
    assert_bitwise(to_official(from_official(grads, config), config), grads)


@pytest.mark.parametrize("variant", ["e2e", "swa", "full"])
def test_to_official_inverts_from_official_on_random_states(variant: str) -> None:
    config = TTTConfig(vocab_size=50, hidden_size=24, num_layers=5, num_heads=3,
                       intermediate_size=40, prime_intermediate_size=56, num_ttt_layers=2,
                       window=16, chunk_size=8, bos_token_id=0, eos_token_id=0, variant=variant)
    generator = torch.Generator().manual_seed(0)
    shapes = {n: s for n, s in official_shapes(config).items()}
    template = from_official(_fake_official(config), config)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in template.items()}
    official = to_official(state, config)
    assert {k: v.shape for k, v in official.items()} == shapes
    back = from_official(official, config)
    assert set(back) == set(state)
    for name, value in state.items():
        assert torch.equal(back[name], value), name
    if variant == "e2e":
        assert "layers.3.prime.w3.weight" in state and "layers.2.prime.w3.weight" not in state
        assert back["layers.4.prime.w3.weight"].shape == (56, 24)
    else:
        assert not any(".prime" in k for k in state)


def test_from_official_missing_tensor(params: dict[str, np.ndarray], config: TTTConfig) -> None:
    name = P + "h.blocks.seq_modeling_block.k_norm.weight"
    with pytest.raises(ValueError) as err:
        from_official({k: v for k, v in params.items() if k != name}, config)
    assert name in one_line(err)


def test_from_official_shape_mismatch(params: dict[str, np.ndarray], config: TTTConfig) -> None:
    name = P + "h.blocks.feed_forward.w2.weight"
    arrays = dict(params)
    arrays[name] = np.ascontiguousarray(np.swapaxes(params[name], 1, 2))
    with pytest.raises(ValueError) as err:
        from_official(arrays, config)
    message = one_line(err)
    assert name in message and "[4, 64, 128]" in message and "[4, 128, 64]" in message


def test_from_official_unexpected_tensor(params: dict[str, np.ndarray],
                                         config: TTTConfig) -> None:
    arrays = {**params, P + "lm_head.weight": params[P + "wte.weight"]}
    with pytest.raises(ValueError) as err:
        from_official(arrays, config)
    assert P + "lm_head.weight" in one_line(err)


def test_from_official_rejects_prime_for_baseline(params: dict[str, np.ndarray]) -> None:
    config = TTTConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4,
                       intermediate_size=128, variant="swa", window=64, chunk_size=32)
    with pytest.raises(ValueError) as err:
        from_official(params, config)
    assert "feed_forward_prime" in one_line(err)


def test_to_official_errors(params: dict[str, np.ndarray], config: TTTConfig) -> None:
    state = from_official(params, config)
    with pytest.raises(ValueError) as err:
        to_official({k: v for k, v in state.items() if k != "layers.2.prime.w2.weight"}, config)
    assert "layers.2.prime.w2.weight" in one_line(err)
    with pytest.raises(ValueError) as err:
        to_official({**state, "layers.1.attn.wq.weight": torch.zeros(64, 65)}, config)
    message = one_line(err)
    assert "layers.1.attn.wq.weight" in message and "[64, 65]" in message
    with pytest.raises(ValueError) as err:
        to_official({**state, "lm_head.weight": torch.zeros(256, 64)}, config)
    assert "lm_head.weight" in one_line(err)


# ---------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tttlm")
    convert_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_parses_every_option() -> None:
    args = _parser().parse_args(
        ["convert", "official", "src", "dst", "--window", "64", "--chunk", "32",
         "--rope-theta", "10000", "--bos-id", "1", "--variant", "swa"])
    assert (args.src, args.dst, args.window, args.chunk, args.rope_theta, args.bos_id,
            args.variant) == ("src", "dst", 64, 32, 10000.0, 1, "swa")
    assert callable(args.func)
    with pytest.raises(SystemExit):
        _parser().parse_args(["convert", "official", "a", "b", "--variant", "e2e"])


@pytest.mark.parametrize("make_src", [
    lambda tmp: tmp,  # an empty folder: not a checkpoint
    lambda tmp: tmp / "missing",
    lambda tmp: FIXTURE / "parity.npz",  # vocab 256 without --bos-id
])
def test_cli_user_errors_are_one_line(make_src, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "official", str(make_src(tmp_path)), str(tmp_path / "out"),
                 "--window", "64", "--chunk", "32"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("tttlm convert official: error: ") and "; " in err[-1]
    assert all(line.startswith("tttlm convert official: ") for line in err)
    assert not (tmp_path / "out").exists()


def test_cli_prints_every_assumed_value(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Before: window 8192, chunk 1024, theta 5e5 and the token ids were assumed silently.
    dst = tmp_path / "model"
    assert main(["convert", "official", str(FIXTURE / "parity.npz"), str(dst),
                 "--bos-id", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote {dst}"
    notes = captured.err.splitlines()
    assert all(n.startswith("tttlm convert official: assumed ") for n in notes)
    text = "\n".join(notes)
    for value, option in (("window k = 8192", "--window K"), ("chunk size b = 1024", "--chunk B"),
                          ("RoPE theta = 500000", "--rope-theta T"), ("EOS id 1", "--eos-id N")):
        assert value in text and option in text, (value, text)
    assert "--bos-id" not in text and "variant" not in text  # given, and seen in the tensors
    config = json.loads((dst / "config.json").read_text())
    assert (config["window"], config["chunk_size"], config["eos_token_id"]) == (8192, 1024, 1)

    assert main(["convert", "official", str(FIXTURE / "parity.npz"), str(tmp_path / "m2"),
                 "--bos-id", "1", "--eos-id", "1", "--window", "64", "--chunk", "32",
                 "--rope-theta", "10000"]) == 0
    assert capsys.readouterr().err == ""  # nothing assumed, nothing said


def test_assumed_settings_of_a_baseline() -> None:
    from tttlm.convert.official import assumed_settings

    config = TTTConfig.from_preset("tiny", "full", vocab_size=128256, bos_token_id=128000,
                                   eos_token_id=128001)
    notes = assumed_settings(config, bos_token_id=None, variant=None)
    text = " | ".join(notes)
    assert "variant full" in text and "--variant swa" in text
    assert "unused by full attention" in text and "BOS id 128000" in text
    assert "EOS id 128001 (Llama-3's)" in text


# ------------------------------------------------------------------------- full conversion
@pytest.mark.parametrize("source", ["npz", "orbax"])
def test_convert_official_reproduces_official_losses(source: str, tmp_path: Path,
                                                     npz: dict[str, np.ndarray],
                                                     params: dict[str, np.ndarray]) -> None:
    if source == "orbax":
        pytest.importorskip("tensorstore")  # optional third-party reader (the orbax extra)

    src = FIXTURE / "parity.npz" if source == "npz" else ORBAX
    dst = convert_official(src, tmp_path / "model", window=64, chunk_size=32,
                           rope_theta=10000.0, bos_token_id=1)
    assert dst == tmp_path / "model" and any(dst.iterdir())
    model = TTTForCausalLM.from_pretrained(dst)
    config = infer_config(params, window=64, chunk_size=32, rope_theta=10000.0, bos_token_id=1)
    assert model.config.to_dict() == config.to_dict()
    assert_bitwise(to_official(model.state_dict(), config), params)

    ids = torch.from_numpy(npz["input/input_ids"]).long()[None]
    targets = torch.from_numpy(npz["input/target_tokens"]).long()[None]
    with torch.no_grad():
        pretrain = model(ids, targets, ttt=False).loss.item()
        meta = model(ids, targets).loss.item()
    assert abs(pretrain - float(npz["pretrain/loss"])) < 2e-5
    assert abs(meta - float(npz["meta/loss"])) < 2e-5
