"""The whole training step as a CUDA graph (``GraphedStep``): input checks everywhere; on a GPU,
replays give the losses and weights of eager steps, the exact meta-gradient included."""

from __future__ import annotations

import copy

import pytest
import torch

from _helpers import assert_close, tiny_model, tokens
from tttlm.train.graphs import GraphedStep, _copy_into


def test_needs_cuda_inputs() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        GraphedStep(lambda x: x.sum(), torch.zeros(3))


def test_replay_inputs_must_match_the_capture() -> None:
    static = [torch.zeros(2, 5, dtype=torch.long)]
    with pytest.raises(ValueError, match="captured for"):
        _copy_into(static, [torch.zeros(2, 6, dtype=torch.long)])
    with pytest.raises(ValueError, match="1 inputs"):
        _copy_into(static, [])
    _copy_into(static, [torch.ones(2, 5, dtype=torch.long)])
    assert int(static[0].sum()) == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("grad_mode", ["exact", "first_order"])
def test_graphed_meta_step_matches_eager_steps(grad_mode: str) -> None:
    eager = tiny_model(dtype=torch.float32).cuda()
    graphed_model = copy.deepcopy(eager)
    batches = [tokens(eager, 2, 24, seed=s) for s in range(4)]

    def make(model: torch.nn.Module):  # type: ignore[no-untyped-def]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = model(x, labels=y, grad_mode=grad_mode).loss
            loss.backward()
            opt.step()
            return loss.detach()
        return step

    eager_step = make(eager)
    # The graph's warm-up runs two eager steps on the first batch; mirror them.
    x0, y0 = (t.cuda() for t in batches[0])
    expected = [float(eager_step(x0, y0)) for _ in range(3)]
    graphed = GraphedStep(make(graphed_model), x0, y0)  # two warm-up steps + one captured
    got = [float(graphed(x0, y0))]
    for x, y in batches[1:]:
        expected.append(float(eager_step(x.cuda(), y.cuda())))
        got.append(float(graphed(x.cuda(), y.cuda())))
    # A capture records kernels without running them: the first replay is the third step.
    assert_close(torch.tensor(got), torch.tensor(expected[2:]), rel_l2=1e-4, name="loss")
    for (name, a), b in zip(eager.state_dict().items(), graphed_model.state_dict().values()):
        assert_close(b, a, rel_l2=1e-4, name=name)
