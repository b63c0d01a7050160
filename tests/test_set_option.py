"""`lorakit train --set SECTION.KEY=VALUE`: what a command-line setting sets, and how a wrong one is answered."""

from __future__ import annotations

import pytest

from lorakit.config import ConfigError, TrainConfig, set_option


@pytest.mark.parametrize("item", ["early_stop.no_such_key=1", "nosection.key=1"])
def test_the_setting_check_catches_a_wrong_name(item):
    dotted, _, raw = item.partition("=")
    with pytest.raises(ConfigError, match="(?i)unknown"):
        set_option(TrainConfig(), dotted, raw)


def test_one_entry_of_a_table_setting_is_set_alone_and_kohyas_list_spelling_is_answered():
    """`--set network.args.factor=4` (kohya's `--network_args factor=4`) sets that entry and keeps the others;
    `--set network.block_dims=4,4,4` (kohya's spelling) says how TOML writes a list."""
    cfg = TrainConfig()
    set_option(cfg, "network.args", "{decompose_both = true}")
    set_option(cfg, "network.args.factor", "4")
    assert cfg.network.args == {"decompose_both": True, "factor": 4}
    with pytest.raises(ConfigError, match=r"write a list as TOML does, --set network.block_dims=\[4,4,4\]"):
        set_option(cfg, "network.block_dims", "4,4,4")
    with pytest.raises(ConfigError, match="unknown key 'rank.x'"):  # a setting that is no table has no entries
        set_option(cfg, "network.rank.x", "1")
