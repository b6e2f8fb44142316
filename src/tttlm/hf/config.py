"""``TTTLMConfig``: a tttlm model's config as a transformers ``PreTrainedConfig``.

It holds the fields of :class:`tttlm.config.TTTConfig` under their own names (so a tttlm
``config.json``, which already says ``"model_type": "tttlm"``, loads through ``AutoConfig``
unchanged) and validates them the way tttlm does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from transformers import PreTrainedConfig

from tttlm.config import TTTConfig
from tttlm.errors import UserError

MODEL_TYPE = "tttlm"
TTT_FIELDS = tuple(f.name for f in dataclasses.fields(TTTConfig))


class TTTLMConfig(PreTrainedConfig):
    """transformers' view of a :class:`~tttlm.config.TTTConfig` (``model_type="tttlm"``).

    Build one from a tttlm config with :meth:`from_ttt_config`; :attr:`ttt_config` gives it
    back. Every tttlm field is an attribute of the same name; the usual transformers names
    (``num_hidden_layers``, ``num_attention_heads``) are aliases.
    """

    model_type: ClassVar[str] = MODEL_TYPE
    attribute_map: ClassVar[dict[str, str]] = {"num_hidden_layers": "num_layers",
                                               "num_attention_heads": "num_heads"}

    def __post_init__(self, **kwargs: Any) -> None:
        # Unset fields take TTTConfig's defaults, so TTTLMConfig() is a valid (default) model.
        defaults = TTTConfig().to_dict()
        for name in TTT_FIELDS:
            kwargs.setdefault(name, defaults[name])
        super().__post_init__(**kwargs)
        self.ttt_config  # noqa: B018 -- validate now, not at the first forward

    @property
    def ttt_config(self) -> TTTConfig:
        """The tttlm config these fields describe (validated; a ``UserError`` if invalid)."""
        fields = {name: getattr(self, name) for name in TTT_FIELDS}
        try:
            return TTTConfig.from_dict(fields)
        except (TypeError, ValueError) as err:
            raise UserError(f"invalid tttlm config: {err}") from None

    @classmethod
    def from_ttt_config(cls, config: TTTConfig) -> TTTLMConfig:
        """The transformers config of a tttlm config (same fields, same values)."""
        return cls(**config.to_dict())
