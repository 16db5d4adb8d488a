"""The training recipe's configuration contract: TOML files only change defaults, every
``--key=value`` is checked against the dataclass, and errors are one line naming the key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `training/` is a recipe next to the package, not installed

from training.config import ConfigError, TrainConfig, load_config  # noqa: E402
from training.corpus import Split, load_corpus, split_of  # noqa: E402
from training.train_lm import lr_at, main  # noqa: E402

SHIPPED = ("tiny-mixtral", "tiny-qwen3moe", "tiny-olmoe")
CONFIGS = [ROOT / "training" / "configs" / f"{name}.toml" for name in SHIPPED]


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == TrainConfig()
    with pytest.raises(Exception):  # frozen
        cfg.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_name_their_model(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.n_layer >= 8 and cfg.n_expert_used >= 2


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ("--lr=0.001", "lr", 0.001),
        ("--lr=1", "lr", 1.0),  # an int literal is a fine float
        ("--max_steps=70", "max_steps", 70),
        ("--max-steps=70", "max_steps", 70),  # dashes accepted for underscores
        ("--name=x", "name", "x"),
        ("--arch=qwen3moe", "arch", "qwen3moe"),
    ],
)
def test_overrides_are_typed(override, field, value):
    cfg = load_config(None, [override])
    assert getattr(cfg, field) == value
    assert type(getattr(cfg, field)) is type(value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--foo=1"], "--foo: unknown config key"),
        (["--lr=fast"], "--lr: expected float, got 'fast'"),
        (["--max_steps=1.5"], "--max_steps: expected int, got '1.5'"),
        (["lr=1"], "'lr=1': expected --key=value"),
        (["--lr"], "'--lr': expected --key=value"),
        (["--arch=gpt"], "arch: expected one of"),
        (["--n_expert_used=9"], "n_expert_used: expected 1..n_expert=8"),
        (["--warmup_steps=10", "--max_steps=5"], "warmup_steps: expected < max_steps=5"),
        (["--arch=olmoe"], "n_kv_head: olmoe has no GQA, expected n_head=4, got 2"),
        (["--arch=olmoe", "--n_kv_head=4", "--head_dim=32"],
         "head_dim: olmoe needs n_head * head_dim == n_embd=160, got 4 * 32"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("nope = 1\n", "unknown key 'nope'"),
        ("lr = 'high'\n", "lr: expected float, got 'high'"),
        ("max_steps = 2.5\n", "max_steps: expected int, got 2.5"),
        ("seed = true\n", "seed: expected int, got True"),
        ("lr = [\n", "cannot read config"),
    ],
)
def test_bad_toml_names_file_and_key(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("lr = 0.5\nmax_steps = 100\n")
    cfg = load_config(path, ["--max_steps=200"])
    assert (cfg.lr, cfg.max_steps) == (0.5, 200)


@pytest.mark.parametrize("argv", [["--bogus=1"], ["--lr=x"], ["--config"]])
def test_cli_exits_2_with_one_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_lr_schedule_warms_up_then_decays():
    cfg = load_config(None, ["--lr=1.0", "--warmup_steps=10", "--max_steps=110",
                             "--min_lr_ratio=0.1"])
    lrs = [lr_at(s, cfg) for s in range(cfg.max_steps)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_corpus_splits_are_disjoint_and_deterministic():
    names = {s: {(d.domain, d.name) for d in load_corpus(s)} for s in ("train", "valid",
                                                                          "heldout")}
    assert not (names["train"] & names["heldout"]) and not (names["valid"] & names["heldout"])
    assert not (names["train"] & names["valid"])
    for split in ("valid", "heldout"):
        assert {d for d, _ in names[split]} == {"code", "prose"}
    assert all(split_of(d, n) is Split.HELDOUT for d, n in names["heldout"])
    assert not any("/test/" in f"/{n}" or n.startswith("idlelib/") for _, n in names["train"])
