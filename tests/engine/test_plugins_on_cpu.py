"""A plugin outside `opd.core` registers an advantage estimator and a policy loss; the launcher's environment
variables select them by name (OPD_PLUGINS names the module) and the local engine trains a step with them."""

from __future__ import annotations

import sys
import textwrap

import pytest

from opd.core.config import OPDConfig
from opd.core.plugins import PluginError, load_plugins
from opd.engines.local import trainer
from opd.engines.local.logging import read_metrics

PLUGIN = textwrap.dedent('''
    """A test plugin: a constant advantage and a policy loss that scales the plain surrogate by 3."""
    from opd.core import POLICY_LOSSES, register_estimator
    from opd.core.loss import importance_sampling

    CALLS = {"estimator": 0, "loss": 0}

    @register_estimator("plugin_const", needs_token_rewards=True, needs_outcome_scores=False,
                        needs_group_index=False)
    def plugin_const(*, token_rewards, response_mask_NT, group_index_N, outcome_scores_N, cfg):
        CALLS["estimator"] += 1
        return (token_rewards * 0 + 1.0) * response_mask_NT.unsqueeze(-1)

    @POLICY_LOSSES.register("plugin_triple")
    def plugin_triple(log_prob, old_log_prob, advantages, cfg):
        CALLS["loss"] += 1
        loss, info = importance_sampling(log_prob, old_log_prob, advantages, cfg)
        return 3 * loss, info
''')


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "opd_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OPD_PLUGINS", "opd_test_plugin")
    yield
    sys.modules.pop("opd_test_plugin", None)  # the registry keeps its names; the module is not imported again


def test_registered_names_train_a_local_step_selected_from_the_environment(tiny_cfg, plugin_module):
    env = {"ADV_ESTIMATOR": "plugin_const", "POLICY_LOSS": "plugin_triple", "LOG_PROB_TOP_K": "4"}
    cfg = tiny_cfg(total_steps=1, **env)  # launcher variable names, resolved as `opd train --from-env` does
    assert (cfg.algo.adv_estimator, cfg.algo.policy_loss) == ("plugin_const", "plugin_triple")
    run_dir = trainer.train(cfg)
    calls = sys.modules["opd_test_plugin"].CALLS
    assert calls == {"estimator": 1, "loss": 1}  # one step: one advantage call, one micro-batch loss
    (row,) = read_metrics(run_dir)
    # advantage 1 on each of the K = 4 valid slots, ratio 1 on-policy, times 3: the token-mean loss is -12
    assert row["actor/pg_loss"] == pytest.approx(-12.0, rel=1e-5)
    assert row["actor/pg_clipfrac"] == 0.0


def test_unknown_plugin_module_and_unregistered_name_are_named(monkeypatch):
    monkeypatch.setenv("OPD_PLUGINS", "no_such_opd_plugin_module")
    with pytest.raises(PluginError, match="OPD_PLUGINS: cannot import 'no_such_opd_plugin_module'"):
        load_plugins()
    monkeypatch.delenv("OPD_PLUGINS")
    with pytest.raises(
        ValueError,
        match=r"OPDConfig.policy_loss='triple' is not valid; allowed: ppo, "
        r"importance_sampling",
    ):
        OPDConfig(policy_loss="triple")
