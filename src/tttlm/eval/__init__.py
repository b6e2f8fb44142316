"""Evaluation: loss by context length, needle in a haystack, merged comparison reports.

Library entry points (the ``tttlm eval`` commands are thin wrappers around them):

- :func:`load_model`, :func:`load_corpus`: models in their evaluation mode and token data;
- :func:`evaluate_loss` → report dict; :func:`write_loss_outputs`, :func:`format_table`,
  :func:`coarsen_curves`, :func:`plot_loss_by_position`;
- :func:`build_haystack`, :func:`build_sample`, :func:`evaluate_niah`, :func:`niah_report`,
  :func:`write_niah_outputs`; the scoring functions :func:`score_answer`, :func:`accuracy`,
  :func:`aggregate`;
- :func:`compare`: merge result files into a Markdown report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    from tttlm.eval.adapters import EvalError, TokenCorpus, builtin_books, tokenize_documents
    from tttlm.eval.common import EvalModel, load_corpus, load_model
    from tttlm.eval.compare import compare
    from tttlm.eval.loss import (
        WindowMode,
        bucket_means,
        coarsen_curves,
        evaluate_loss,
        format_table,
        max_length,
        plan_windows,
        write_loss_outputs,
    )
    from tttlm.eval.niah import (
        NeedleKind,
        NiahSample,
        NiahSettings,
        Prediction,
        accuracy,
        aggregate,
        build_haystack,
        build_sample,
        evaluate_niah,
        extract_answer,
        model_predictor,
        niah_report,
        score_answer,
        write_niah_outputs,
    )
    from tttlm.eval.plots import plot_loss_by_position, plot_repeat
    from tttlm.eval.repeat import (
        RepeatSettings,
        default_distances,
        evaluate_repeat,
        format_repeat_table,
        write_repeat_outputs,
    )

__all__ = [
    "EvalError",
    "EvalModel",
    "NeedleKind",
    "NiahSample",
    "NiahSettings",
    "Prediction",
    "RepeatSettings",
    "TokenCorpus",
    "WindowMode",
    "accuracy",
    "aggregate",
    "build_haystack",
    "bucket_means",
    "build_sample",
    "builtin_books",
    "coarsen_curves",
    "compare",
    "default_distances",
    "evaluate_loss",
    "evaluate_niah",
    "evaluate_repeat",
    "extract_answer",
    "format_repeat_table",
    "format_table",
    "load_corpus",
    "load_model",
    "max_length",
    "model_predictor",
    "niah_report",
    "plan_windows",
    "plot_loss_by_position",
    "plot_repeat",
    "score_answer",
    "tokenize_documents",
    "write_loss_outputs",
    "write_niah_outputs",
    "write_repeat_outputs",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["EvalError", "TokenCorpus", "builtin_books", "tokenize_documents"],
                    "tttlm.eval.adapters"),
    **dict.fromkeys(["EvalModel", "load_corpus", "load_model"], "tttlm.eval.common"),
    "compare": "tttlm.eval.compare",
    **dict.fromkeys(["WindowMode", "bucket_means", "coarsen_curves", "evaluate_loss",
                     "format_repeat_table",
    "format_table", "max_length", "plan_windows", "write_loss_outputs"],
                    "tttlm.eval.loss"),
    **dict.fromkeys(["plot_loss_by_position", "plot_repeat"], "tttlm.eval.plots"),
    **dict.fromkeys(["RepeatSettings", "default_distances", "evaluate_repeat",
                     "format_repeat_table", "write_repeat_outputs"], "tttlm.eval.repeat"),
    **dict.fromkeys(["NeedleKind", "NiahSample", "NiahSettings", "Prediction", "accuracy",
                     "aggregate", "build_haystack", "build_sample", "evaluate_niah",
                     "extract_answer", "model_predictor", "niah_report", "score_answer",
                     "write_niah_outputs"], "tttlm.eval.niah"),
})
