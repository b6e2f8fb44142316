"""``tttlm convert hf``: import a transformers Llama, Qwen2 or Qwen3 model into tttlm.

The source is a transformers model folder (``config.json`` and safetensors weights) or a GGUF
file (read through transformers' GGUF loader, which dequantises every tensor to float32 and
undoes llama.cpp's query/key permutation; needs the ``gguf`` and ``accelerate`` packages).
The model is loaded with transformers itself, so that every detail transformers knows about
the checkpoint (tied heads, RoPE parameters, GGUF metadata) is the one used; its weights are
then renamed into a ``full`` tttlm model of the same function (Llama's half-split RoPE,
pre-norms, grouped-query attention; :class:`~tttlm.config.TTTConfig`'s Llama-family options).
``tests/test_convert_hf.py`` checks the logits against transformers' for each family and
option, ``tests/test_convert_smollm2.py`` the perplexity of SmolLM2 imported from GGUF.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tttlm.config import OFFICIAL_CHUNK_SIZE, TTTConfig, Variant
from tttlm.errors import UserError
from tttlm.model.model import TTTForCausalLM

# transformers architectures imported, with the options that differ between them.
ARCHITECTURES: dict[str, str] = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                                 "Qwen3ForCausalLM": "qwen3"}
MODEL_TYPES: dict[str, str] = {family: arch for arch, family in ARCHITECTURES.items()}
# RoPE types of transformers tttlm computes the same way (ops/rope.py).
ROPE_TYPES = ("default", "linear", "llama3")
INSTALL = "pip install 'tttlm[convert-hf]'"

# transformers' names inside ``model.layers.{i}.`` → tttlm's inside ``layers.{i}.``
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj": "attn.wq",
    "self_attn.k_proj": "attn.wk",
    "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    # Llama's "post_attention_layernorm" is the MLP's pre-norm (there are no post-norms).
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj": "mlp.w1",
    "mlp.down_proj": "mlp.w2",
    "mlp.up_proj": "mlp.w3",
}


def locate(src: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """The folder transformers reads and the GGUF file name in it (``None``: safetensors).

    ``src``: a model folder, a ``.gguf`` file, or a folder holding one ``.gguf`` file and no
    ``config.json``."""
    path = Path(src)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a transformers model folder or a .gguf "
                        "file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf file; give a transformers model "
                            "folder (config.json + *.safetensors) or a .gguf file")
        return path.parent, path.name
    if (path / "config.json").is_file():
        if not any(path.glob("*.safetensors")):
            raise UserError(f"{path} has a config.json but no *.safetensors weights; save the "
                            "model with save_pretrained (safe_serialization) or give a .gguf "
                            "file")
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if ggufs:
        raise UserError(f"{path} holds several .gguf files ({', '.join(ggufs)}); give the "
                        "file to import")
    raise UserError(f"{path} has neither a config.json with safetensors weights nor a .gguf "
                    "file; give a transformers model folder or a .gguf file")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError(f"importing a transformers model needs transformers; {INSTALL}") \
            from None
    return transformers


def _gguf_available(gguf_file: str | None) -> None:
    if gguf_file is None:
        return
    # transformers' GGUF loader imports both (and says so only after reading the config).
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise UserError(f"reading {gguf_file} needs the {package} package; {INSTALL}")


def load_hf_config(folder: Path, gguf_file: str | None = None) -> Any:
    """transformers' config of the source, checked to be an architecture tttlm imports."""
    transformers = _transformers()
    _gguf_available(gguf_file)
    where = folder / gguf_file if gguf_file else folder
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{where}: transformers cannot read its config ({reason}); give a "
                        "Llama, Qwen2 or Qwen3 model") from None
    arch = _architecture(hf_config)
    if arch not in ARCHITECTURES:
        raise UserError(f"{where}: architecture {arch} is not supported; tttlm imports "
                        f"{', '.join(ARCHITECTURES)} (SmolLM2 is a Llama)")
    return hf_config


def _architecture(hf_config: Any) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return str(archs[0])
    model_type = str(getattr(hf_config, "model_type", ""))
    return MODEL_TYPES.get(model_type, model_type or "unknown")


def config_from_hf(hf_config: Any) -> TTTConfig:
    """The ``full`` tttlm config of a transformers Llama/Qwen2/Qwen3 config: causal full
    attention (the window, unused by ``full``, is set to the model's maximum positions so that
    :func:`~tttlm.convert.ttt_ify.ttt_ify` starts from a meaningful one)."""
    family = ARCHITECTURES[_architecture(hf_config)]
    unsupported = _unsupported(hf_config, family)
    if unsupported:
        raise UserError(f"this {family} model uses {unsupported}, which tttlm does not "
                        "compute; only Llama/Qwen models with SiLU MLPs, full attention and "
                        f"RoPE of type {', '.join(ROPE_TYPES)} import")
    rope = _rope_parameters(hf_config)
    scaling = None
    if rope.get("rope_type", "default") != "default":
        keys = ("factor",) if rope["rope_type"] == "linear" else (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {"rope_type": rope["rope_type"], **{k: rope[k] for k in keys}}
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    bos, eos = _special_ids(hf_config)
    max_positions = int(getattr(hf_config, "max_position_embeddings", 0) or 8192)
    return TTTConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers, num_heads=heads,
        intermediate_size=hf_config.intermediate_size, variant=Variant.FULL,
        window=max_positions, chunk_size=min(OFFICIAL_CHUNK_SIZE, max_positions),
        rope_theta=float(rope["rope_theta"]), rms_norm_eps=float(hf_config.rms_norm_eps),
        initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
        bos_token_id=bos, eos_token_id=eos,
        num_kv_heads=kv_heads, head_dim=head_dim, qk_norm=family == "qwen3", post_norms=False,
        rope_layout="half", rope_freq_scaling=scaling,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        # Qwen2 has q/k/v biases and none on the output; Llama's attention_bias is all four.
        qkv_bias=family == "qwen2" or attention_bias,
        attn_out_bias=family != "qwen2" and attention_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    # Configs written by transformers 4.x keep theta and scaling apart.
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    return {"rope_theta": getattr(hf_config, "rope_theta", 10000.0), **scaling}


def _unsupported(hf_config: Any, family: str) -> str:
    rope = _rope_parameters(hf_config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        return f"RoPE type {rope['rope_type']!r}"
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary embeddings"
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        return f"the {act!r} activation"
    if family != "llama" and getattr(hf_config, "use_sliding_window", False):
        return "sliding-window layers"
    layer_types = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"layer types {sorted(layer_types)}"
    return ""


def _special_ids(hf_config: Any) -> tuple[int, int]:
    """BOS (the document joiner of tttlm's data; EOS when the model has none, as Qwen) and
    the first EOS id."""
    def first(value: Any) -> int | None:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        return int(value) if value is not None else None

    eos = first(getattr(hf_config, "eos_token_id", None))
    bos = first(getattr(hf_config, "bos_token_id", None))
    eos = eos if eos is not None else (bos if bos is not None else 0)
    return (bos if bos is not None else eos), eos


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: TTTConfig
                       ) -> dict[str, torch.Tensor]:
    """transformers' tensors renamed to tttlm's (same values, same layouts: both store
    ``nn.Linear`` weights ``[out, in]`` and split heads head-major)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        if name == "model.embed_tokens.weight":
            out["embed.weight"] = tensor
        elif name == "model.norm.weight":
            out["norm.weight"] = tensor
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                out["lm_head.weight"] = tensor
        elif name.startswith("model.layers."):
            index, _, rest = name[len("model.layers."):].partition(".")
            stem, dot, kind = rest.rpartition(".")
            if rest in _LAYER_NAMES:
                out[f"layers.{index}.{_LAYER_NAMES[rest]}"] = tensor
            elif stem in _LAYER_NAMES and kind in ("weight", "bias"):
                out[f"layers.{index}.{_LAYER_NAMES[stem]}{dot}{kind}"] = tensor
            else:
                raise UserError(f"tensor {name} has no place in a tttlm model; the checkpoint "
                                "has parts tttlm does not import")
        elif not name.endswith("rotary_emb.inv_freq"):  # recomputed from the config
            raise UserError(f"tensor {name} has no place in a tttlm model; the checkpoint has "
                            "parts tttlm does not import")
    return out


def import_hf(src: str | os.PathLike[str], dtype: torch.dtype | None = None
              ) -> tuple[TTTForCausalLM, Any]:
    """The tttlm model (``full``) of a transformers folder or GGUF file, and its tokenizer
    (transformers' tokenizer object; ``None`` when the source has none).

    ``dtype``: of the weights (default: as stored; GGUF files dequantise to float32)."""
    folder, gguf_file = locate(src)
    load_hf_config(folder, gguf_file)  # refuses other architectures before reading weights
    transformers = _transformers()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf_file, dtype=dtype if dtype is not None else "auto")
    return from_hf_model(hf_model), load_hf_tokenizer(folder, gguf_file)


def from_hf_model(hf_model: Any) -> TTTForCausalLM:
    """The tttlm model (``full``) of a loaded transformers Llama/Qwen2/Qwen3 model; the
    tensors are shared, not copied."""
    arch = _architecture(hf_model.config)
    if arch not in ARCHITECTURES:
        raise UserError(f"architecture {arch} is not supported; tttlm imports "
                        f"{', '.join(ARCHITECTURES)} (SmolLM2 is a Llama)")
    config = config_from_hf(hf_model.config)
    state = state_dict_from_hf(hf_model.state_dict(), config)
    with torch.device("meta"):
        model = TTTForCausalLM(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"the checkpoint does not match its config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); it is damaged or not a plain "
                        "Llama/Qwen model")
    model.load_state_dict(state, assign=True)
    model.eval()
    return model


def load_hf_tokenizer(folder: Path, gguf_file: str | None = None) -> Any:
    """transformers' tokenizer of the source, or ``None`` when it has none."""
    transformers = _transformers()
    if gguf_file is None and not any((folder / name).is_file() for name in (
            "tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def convert_hf(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
               to: Variant | str = Variant.FULL, window: int | None = None,
               chunk_size: int | None = None, num_ttt_layers: int | None = None,
               prime_intermediate_size: int | None = None, seed: int = 0,
               bos_token_id: int | None = None,
               log: Callable[[str], None] | None = None) -> Path:
    """Import ``src`` (see :func:`import_hf`), optionally turn it into a sliding-window
    (``swa``) or TTT-E2E (``e2e``) model (:func:`~tttlm.convert.ttt_ify.ttt_ify`), and write
    the model folder ``dst`` with its tokenizer (``tokenizer.json``,
    ``tokenizer_config.json``). The folder is assembled beside ``dst`` and put in place
    whole.

    BOS (tttlm's document joiner, whose targets the loss skips): ``bos_token_id`` when given,
    else the one tttlm's data pipeline finds in the written tokenizer (so that ``tttlm data
    prepare`` with it and ``tttlm train`` agree), else the source config's."""
    from tttlm.convert.ttt_ify import ttt_ify
    from tttlm.files import commit_dir, staging_dir

    model, tokenizer = import_hf(src)
    variant = Variant(to)
    if variant is not Variant.FULL:
        if window is None:
            raise UserError(f"--to {variant.value} needs --window K (the sliding window)")
        model = ttt_ify(model, variant, window=window, chunk_size=chunk_size,
                        num_ttt_layers=num_ttt_layers,
                        prime_intermediate_size=prime_intermediate_size, seed=seed)
    out = Path(dst)
    _check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        elif log is not None:
            log(f"{src} has no tokenizer; {out} holds the model only (copy tokenizer.json and "
                "tokenizer_config.json into it to use text)")
        bos = bos_token_id if bos_token_id is not None else _data_bos(tmp, model.config, log)
        if bos is not None and bos != model.config.bos_token_id:
            model.config = _with_bos(model.config, bos)
        model.save_pretrained(tmp)
        commit_dir(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_destination(out: Path) -> None:
    """Refuse to replace anything but a tttlm model folder (or an empty folder)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; give a new folder name")
    config = out / "config.json"
    if any(out.iterdir()) and not (config.is_file() and '"tttlm"' in config.read_text(
            encoding="utf-8", errors="replace")):
        raise UserError(f"{out} exists and is not a tttlm model folder; give a new folder name "
                        "(a tttlm model folder is replaced)")


def _data_bos(folder: Path, config: TTTConfig, log: Callable[[str], None] | None) -> int | None:
    """The BOS id tttlm's data pipeline reads from the tokenizer written to ``folder``, when
    it reads one and the id fits the vocabulary (the source config's BOS is for chat or
    generation and may differ: SmolLM2-Instruct says ``<|im_start|>``, its documents are
    joined by ``<|endoftext|>``)."""
    from tttlm.data.errors import DataError
    from tttlm.data.tokenizer import HF_FILE, HFTokenizer

    file = folder / HF_FILE
    if not file.is_file():
        return None
    try:
        bos = HFTokenizer.from_file(file).bos_id
    except DataError:
        return None
    if not 0 <= bos < config.vocab_size or bos == config.bos_token_id:
        return None
    if log is not None:
        log(f"BOS id {bos} (the document separator tttlm's data pipeline finds in the "
            f"tokenizer) replaces the source config's {config.bos_token_id}; pass --bos-id N "
            "to choose another")
    return bos


def _with_bos(config: TTTConfig, bos: int) -> TTTConfig:
    try:
        return TTTConfig.from_dict({**config.to_dict(), "bos_token_id": bos})
    except ValueError as err:
        raise UserError(f"--bos-id {bos}: {err}") from None
