"""``TTTLMForCausalLM``: a tttlm model as a transformers ``PreTrainedModel``.

The class wraps :class:`tttlm.model.TTTForCausalLM` and shares its modules, so its state dict
has tttlm's names and its folders are tttlm model folders (``config.json`` +
``model.safetensors``, written by tttlm's one folder writer). It keeps tttlm's one forward:

* without a cache (training, scoring), the forward is ``TTTForCausalLM``'s, with transformers'
  label convention: ``labels`` are aligned with ``input_ids`` and shifted inside;
* with a :class:`TTTCache` (``generate``), the forward reads the new tokens through tttlm's
  :class:`~tttlm.inference.Engine` (prefill, then one decode step per token), so generation
  gives the engine's tokens and logits exactly, test-time updates at chunk boundaries included.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from tttlm.errors import UserError
from tttlm.files import atomic_write_text
from tttlm.hf.cache import TTTCache
from tttlm.hf.config import TTTLMConfig
from tttlm.inference import Engine
from tttlm.model.model import IGNORE_INDEX, TTTForCausalLM, save_model_folder

GENERATION_CONFIG_NAME = "generation_config.json"
# Weights files of a folder: tttlm reads these two, transformers' Hub download fetches them.
FOLDER_FILES = ["config.json", "model.safetensors", GENERATION_CONFIG_NAME, "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json"]


class TTTLMForCausalLM(PreTrainedModel, GenerationMixin):
    """A TTT-E2E (or ``swa`` / ``full``) language model with transformers' interface.

    Load with ``AutoModelForCausalLM.from_pretrained(folder)`` (after ``import tttlm.hf``);
    ``model.tttlm`` is the underlying :class:`~tttlm.model.TTTForCausalLM`, whose modules this
    model shares. ``model.engine_options`` are passed to the :class:`~tttlm.inference.Engine`
    that generation uses (``ttt``, ``inner_lr``, ``ignore_bos_targets``, ``cuda_graphs``).
    """

    config_class = TTTLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["Block"]

    def __init__(self, config: TTTLMConfig, model: TTTForCausalLM | None = None) -> None:
        super().__init__(config)
        inner = model if model is not None else TTTForCausalLM(config.ttt_config)
        if inner.config != config.ttt_config:
            raise UserError("the TTTForCausalLM given has another config than the TTTLMConfig; "
                            "build the config with TTTLMConfig.from_ttt_config(model.config)")
        # Share tttlm's modules under tttlm's names: one set of weights, tttlm's state dict.
        # The wrapper itself is kept out of the module tree (its children are ours).
        self.__dict__["tttlm"] = inner
        for name, child in inner.named_children():
            self.add_module(name, child)
        self.engine_options: dict[str, Any] = {}
        self.post_init()

    # tttlm initialises its own weights (the official init) in TTTForCausalLM's constructor;
    # transformers' generic init must not overwrite them, nor loaded ones.
    def _init_weights(self, module: nn.Module) -> None:
        return

    def get_input_embeddings(self) -> nn.Module:
        return self.tttlm.embed

    def get_output_embeddings(self) -> None:
        return None  # the head is tied to the embedding inside tttlm's head

    def train(self, mode: bool = True) -> TTTLMForCausalLM:
        super().train(mode)
        self.tttlm.training = mode  # the wrapper is outside the module tree
        return self

    def engine(self) -> Engine:
        """A fresh :class:`~tttlm.inference.Engine` over the current weights."""
        return Engine(self.tttlm, **self.engine_options)

    # ------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: TTTCache | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, inputs_embeds: torch.Tensor | None = None,
                output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                past_key_values: TTTCache | None = None, **kwargs: Any
                ) -> CausalLMOutputWithPast | tuple[Any, ...]:
        """Logits ``[B, T, V]`` (and the loss with ``labels``) of ``input_ids [B, T]``.

        ``labels`` follow transformers: aligned with ``input_ids``, shifted inside (position t
        is scored on ``labels[:, t + 1]``), ``-100`` not counted; a target equal to BOS is not
        counted either (tttlm's rule). The loss is tttlm's training loss: for ``e2e`` the
        mean over sequences of each sequence's chunk-weighted mean NLL, else the token mean.
        Without labels, an ``e2e`` model still learns at test time from its inputs.

        ``attention_mask`` may pad rows left or right: each row then runs on its own tokens
        (padded positions get zero logits). With ``cache`` (a :class:`TTTCache`) the new
        tokens are read into it and only the logits of each row's last token come back
        (``[B, 1, V]``); ``generate`` makes and passes the cache.
        """
        if inputs_embeds is not None:
            raise UserError("inputs_embeds is not supported: test-time training needs the "
                            "token ids (its targets); pass input_ids")
        if output_attentions or output_hidden_states:
            raise UserError("output_attentions / output_hidden_states are not supported by "
                            "tttlm models; leave them off")
        if input_ids is None:
            raise UserError("input_ids is required")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, TTTCache):
            raise UserError(f"a tttlm model needs a TTTCache, got {type(cache).__name__}; pass "
                            "cache=TTTCache() or let generate make one")
        loss = None
        if cache is not None:
            if labels is not None:
                raise UserError("labels with a cache are not supported; score whole sequences "
                                "without a cache")
            n = input_ids.shape[1]
            mask = attention_mask[:, -n:] if attention_mask is not None else None
            logits = cache.read(self.engine_for(cache), input_ids, mask)[:, None]
        else:
            logits, loss = self._whole(input_ids, attention_mask, labels)
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        if return_dict is False:
            return tuple(x for x in (loss, logits, cache) if x is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def engine_for(self, cache: TTTCache) -> Engine:
        """The engine a cache continues with: its own, or a new one for a new cache."""
        return cache.engine if cache.engine is not None else self.engine()

    def _whole(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tttlm's forward over whole sequences (each padded row on its own)."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            return self._rows(input_ids, attention_mask, labels)
        targets = labels if labels is not None else input_ids
        shifted = torch.full_like(targets, IGNORE_INDEX)
        shifted[:, :-1] = targets[:, 1:]
        # tttlm's rule, as in the engine and evaluation: a BOS target is not counted (nor
        # learned from at test time).
        shifted = shifted.masked_fill(shifted == self.config.bos_token_id, IGNORE_INDEX)
        out = self.tttlm(input_ids, labels=shifted, return_logits=True)
        return out.logits, (out.loss if labels is not None else None)

    def _rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = input_ids.shape
        logits = None
        losses = []
        for r in range(B):
            keep = attention_mask[r].bool()
            idx = keep.nonzero()[:, 0]
            if len(idx) == 0:
                raise UserError(f"row {r} of attention_mask is all 0; give every row a token")
            if int(idx[-1] - idx[0]) + 1 != len(idx):
                raise UserError(f"row {r} of attention_mask has a gap; pad on the left or the "
                                "right only")
            row_labels = labels[r:r + 1, keep] if labels is not None else None
            lg, loss = self._whole(input_ids[r:r + 1, keep], None, row_labels)
            if logits is None:
                logits = lg.new_zeros(B, T, lg.shape[-1])
            logits[r, keep] = lg[0]
            if loss is not None:
                losses.append(loss)
        assert logits is not None
        return logits, (torch.stack(losses).mean() if losses else None)

    # ----------------------------------------------------------------------- generation
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # a TTTCache, never a DynamicCache

    def _prepare_cache_for_generation(self, generation_config: GenerationConfig,
                                      model_kwargs: dict[str, Any], *args: Any,
                                      **kwargs: Any) -> None:
        # transformers' hook that makes the cache generate passes to forward: ours is a
        # TTTCache (a user's one continues a session).
        if generation_config.cache_implementation is not None:
            raise UserError(f"cache_implementation={generation_config.cache_implementation!r} "
                            "is not supported; tttlm models use their TTTCache (leave it unset)")
        cache = model_kwargs.get("cache")
        if cache is not None:
            if not isinstance(cache, TTTCache):
                raise UserError(f"a tttlm model needs a TTTCache, got {type(cache).__name__}")
            cache._is_user_defined = True
            return
        if generation_config.use_cache is not False:
            model_kwargs["cache"] = TTTCache()

    # --------------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike[str],
                        is_main_process: bool = True, state_dict: dict | None = None,
                        push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write a tttlm model folder (``model.safetensors`` recording the config, then
        ``config.json``, durably) plus ``generation_config.json``: tttlm's
        ``TTTForCausalLM.from_pretrained`` and ``AutoModelForCausalLM`` both load it."""
        if push_to_hub:
            raise UserError("push_to_hub is not supported by tttlm's writer; save the folder, "
                            "then upload it with huggingface_hub's upload_folder")
        if not is_main_process:
            return
        path = save_model_folder(save_directory, state_dict or self.tttlm.state_dict(),
                                 self.tttlm.config)
        if self.generation_config is not None:
            atomic_write_text(path / GENERATION_CONFIG_NAME,
                              self.generation_config.to_json_string(use_diff=True))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str],
                        *model_args: Any, config: TTTLMConfig | None = None,
                        dtype: torch.dtype | str | None = None,
                        device_map: str | torch.device | None = None,
                        **kwargs: Any) -> TTTLMForCausalLM:
        """Load a tttlm model folder (or a Hub repository holding one) with tttlm's loader,
        which checks the weights against the config they were saved with.

        ``dtype``: a torch dtype or its name (``"auto"`` or unset: as saved). ``device_map``: one
        device (``"cpu"``, ``"cuda:0"``; ``"auto"``: the GPU when there is one)."""
        if model_args:
            raise UserError("positional model arguments are not supported; pass keywords")
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        path = _local_folder(pretrained_model_name_or_path, kwargs)
        model = TTTForCausalLM.from_pretrained(path, device=_device(device_map),
                                               dtype=_dtype(dtype))
        if config is not None and config.ttt_config != model.config:
            raise UserError(f"the config given differs from {path}/config.json; leave config= "
                            "unset to use the folder's")
        hf_config = TTTLMConfig.from_ttt_config(model.config)
        hf_config._name_or_path = str(pretrained_model_name_or_path)
        out = cls(hf_config, model)
        out.name_or_path = str(pretrained_model_name_or_path)
        out.generation_config = _generation_config(path, hf_config)
        return out.eval()


def _local_folder(name: str | os.PathLike[str], kwargs: dict[str, Any]) -> Path:
    path = Path(name)
    if path.is_dir():
        return path
    if os.path.isabs(name) or str(name).startswith(".") or str(name).count("/") != 1:
        raise UserError(f"{name} is not a folder (a tttlm model folder holds config.json and "
                        "model.safetensors); check the path")
    from huggingface_hub import snapshot_download

    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only")
           if k in kwargs}
    return Path(snapshot_download(str(name), allow_patterns=FOLDER_FILES, **hub))


def _device(device_map: str | torch.device | None) -> torch.device | None:
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        raise UserError("device_map as a dict (sharding across devices) is not supported; give "
                        "one device, e.g. device_map='cuda:0'")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'bfloat16' or "
                        "'float32'")
    return value


def _generation_config(path: Path, config: TTTLMConfig) -> GenerationConfig:
    if (path / GENERATION_CONFIG_NAME).is_file():
        return GenerationConfig.from_pretrained(path)
    generation = GenerationConfig.from_model_config(config)
    # No pad token in tttlm's vocabularies: pad finished rows with EOS (and do not warn).
    generation.pad_token_id = config.eos_token_id
    return generation
