"""Integration modules fail to import with the pip command when their peer is missing; the peer-independent
normalizer helper rescales token_policy_loss to a peer's counts."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from dsrl_fast import PolicyLossConfig, token_policy_loss
from dsrl_fast.integrations.common import peer_policy_loss, pip_extra


def test_missing_peer_names_the_pip_command() -> None:
    # one fresh interpreter in which importing any peer fails, as on a machine without them; each integration
    # module must then fail with an ImportError naming the pip command
    modules = ("trl", "verl", "verl_marginal", "openrlhf")
    code = ("import sys\n"
            "for peer in ('trl', 'verl', 'openrlhf', 'transfer_queue'):\n    sys.modules[peer] = None\n"
            f"for module in {modules!r}:\n"
            "    try:\n        __import__('dsrl_fast.integrations.' + module)\n"
            "    except ImportError as err:\n        print(module, '->', err)\n"
            "    else:\n        print(module, '-> imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert [line.split(" -> ")[0] for line in lines] == list(modules), out.stdout
    extras = {"trl": "trl", "verl": "verl", "verl_marginal": "verl", "openrlhf": "openrlhf"}
    for line in lines:
        assert pip_extra(extras[line.split(" -> ")[0]]) in line, line


def test_package_imports_without_peers() -> None:
    importlib.import_module("dsrl_fast.integrations")
    importlib.import_module("dsrl_fast.integrations.common")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_peer_denominator_rescales_to_the_peer_count(agg: str) -> None:
    logp = -torch.rand(4, 6, dtype=torch.float64)
    adv = torch.tensor([[1.0], [-2.0], [0.5], [-0.5]], dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2, 3:] = False
    cfg = PolicyLossConfig(agg=agg, samples="negative")
    kept, _ = token_policy_loss(logp, adv, mask=mask, config=cfg)
    peer, _ = peer_policy_loss(logp, adv, mask, old_logprobs=None, config=cfg, denominator="peer", peer_count=40.0)
    kept_count = 12 if agg == "token-mean" else 2  # two negative rows of 6 tokens
    torch.testing.assert_close(peer, kept * kept_count / 40.0)
    with pytest.raises(ValueError, match="needs peer_count"):
        peer_policy_loss(logp, adv, mask, old_logprobs=None, config=cfg, denominator="peer")
