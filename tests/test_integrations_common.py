"""Integration modules fail to import with the pip command when their peer is missing; the peer-independent
normalizer helper rescales token_policy_loss to a peer's counts."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from dsrl_fast import PolicyLossConfig, token_policy_loss
from dsrl_fast.integrations.common import peer_policy_loss


@pytest.mark.parametrize(("module", "peer"), [("trl", "trl"), ("verl", "verl"), ("openrlhf", "openrlhf")])
def test_missing_peer_names_the_pip_command(module: str, peer: str) -> None:
    # a fresh interpreter in which importing the peer fails, as on a machine without it
    code = (f"import sys; sys.modules[{peer!r}] = None\n"
            f"try:\n    import dsrl_fast.integrations.{module}\n"
            f"except ImportError as err:\n    print(err)\nelse:\n    print('imported')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'dsrl_fast[integrations]'" in out.stdout, out.stdout


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
