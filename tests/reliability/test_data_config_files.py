"""Issue #14 item 6: config files are bounded and strict, and every failure is one line naming the file and key.

Through ``RetrainConfig.from_file`` and, in their own processes, ``towerflow retrain|backfill --config`` (which
load the config before they start Prefect or read data); no flow runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from towerflow.config import MAX_CONFIG_BYTES, ConfigError, RetrainConfig, WorldConfig

# the 9-level "billion laughs": 9^9 = 387 million strings once expanded
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))


def _cli_error(args: list[str], data_root) -> str:
    """Run the CLI in its own process (not ``main`` under capsys: the retrain command imports Prefect, whose log
    handler would keep the captured stream, closed after the test, for every later flow test of the session)."""
    env = {**os.environ, "TOWERFLOW_DATA_ROOT": str(data_root)}
    proc = subprocess.run([sys.executable, "-m", "towerflow.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr  # one line, no traceback
    return proc.stderr.strip()


def test_a_yaml_alias_bomb_fails_fast_naming_the_file(tmp_path, data_root):
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"YAML aliases \(\*a\) are not allowed"):
        RetrainConfig.from_file(f)
    assert time.perf_counter() - t0 < 1  # was 50 s and 5.7 GB
    err = _cli_error(["retrain", "--config", str(f)], data_root)
    assert err.startswith(f"error: config {f}: invalid YAML: YAML aliases (*a) are not allowed in a config file")
    assert "line 2" in err


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("c.yaml", "train:\n  epochs: true\n", r"train\.epochs: must be a whole number, got True$"),
        ("c.yaml", "train:\n  epochs: '3'\n", r"train\.epochs: must be a whole number, got '3'$"),
        ("c.yaml", "train:\n  future_targets: aut\n", r"train\.future_targets: must be auto or a whole number, "
                                                      r"got 'aut'$"),
        ("c.yaml", "train:\n  future_targets: 0\n", r"train\.future_targets: must be auto or a number "
                                                    r"of targets in \[1, 16\], got 0$"),
        ("c.yaml", "train:\n  average_epochs: -1\n", r"train\.average_epochs: must be auto or a number "
                                                    r"of epochs >= 0, got -1.0$"),
        ("c.yaml", "train:\n  model:\n    use_context: 1\n", r"train\.model\.use_context: must be true or false, got 1$"),
        ("c.yaml", "promote: yes please\n", r"promote: must be true or false, got 'yes please'$"),
        ("c.yaml", "gates:\n  max_regression: false\n", r"gates\.max_regression: must be a number, got False$"),
        ("c.yaml", "train:\n  epoch: 3\n", r"train\.epoch: unknown key$"),
        ("c.yaml", "train:\n  epochs: 0\n  lr: -1\n", r"train\.epochs: Input should be greater than or equal to 1 "
                                                      r"\(and 1 more\)$"),
        ("c.yaml", "- 1\n- 2\n", r"the top level must be a mapping of keys, got list$"),
        ("c.yaml", "train: [\n", r"invalid YAML: .*line 2"),
        ("c.json", '{"train": {"epochs": 3,}}', r"invalid JSON: Expecting property name enclosed in double quotes: "
                                                 r"line 1 column 24"),
        ("c.json", "[" * 100_000 + "]" * 100_000, r"nested too deeply to be a config$"),
        ("c.yaml", "examples:\n  gap_buckets: 8\n", r"\(top level\): examples\.gap_buckets \(8\) must equal "
                                                    r"train\.model\.gap_buckets"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ConfigError, match=rf"^config {f}: {message}"):
        RetrainConfig.from_file(f)


def test_size_limit_and_missing_file(tmp_path, data_root):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"promote": True}) + " " * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match=rf"^config {big}: 1,048,593 bytes, over the 1,048,576-byte limit$"):
        RetrainConfig.from_file(big)
    with pytest.raises(ConfigError, match=rf"^config {tmp_path / 'absent.yaml'}: no such file$"):
        RetrainConfig.from_file(tmp_path / "absent.yaml")


def test_size_limit_holds_for_a_pipe_that_has_no_size(tmp_path):
    import os
    import threading

    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    wrote: list[int] = []

    def feed() -> None:  # 2 MiB of a valid JSON document; stat() says 0 bytes
        try:
            with fifo.open("wb") as w:
                w.write(b'{"promote": true}' + b" " * (2 * MAX_CONFIG_BYTES))
        except BrokenPipeError:  # the reader stopped at the limit and closed its end
            wrote.append(1)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    assert fifo.stat().st_size == 0
    with pytest.raises(ConfigError, match=rf"^config {fifo}: more bytes than the 1,048,576-byte limit$"):
        RetrainConfig.from_file(fifo)
    t.join(10)
    assert not t.is_alive() and wrote == [1]


def test_retrain_overrides_are_validated_like_the_file(tmp_path, capsys):
    from towerflow.cli import main
    from towerflow.commands.retrain import load_config

    with pytest.raises(SystemExit) as exc:
        main(["retrain", "--epochs", "-2"])
    assert exc.value.code == 2 and "argument --epochs: must be at least 1, got -2" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^config defaults with command-line overrides: train\.epochs: "):
        load_config(None, epochs=-2)
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 5\n  batch_size: 64\n")
    config = load_config(str(f), epochs=3, promote=False, promote_wait_s=7.5, refit=False)
    assert (config.train.epochs, config.train.batch_size, config.promote, config.promotion.wait_s) == (3, 64, False, 7.5)
    assert config.train.refit is False and load_config(str(f)).train.refit == "auto"
    from towerflow.cli import build_parser

    assert build_parser().parse_args(["retrain", "--no-refit"]).no_refit


def test_backfill_config_errors_are_one_line_too(tmp_path, data_root):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: true\n")
    assert _cli_error(["backfill", "--start", "2026-01-02", "--end", "2026-01-02", "--config", str(f)],
                      data_root) == f"error: config {f}: train.epochs: must be a whole number, got True"


def test_good_config_loads_and_strictness_keeps_what_is_meant(tmp_path):
    f = tmp_path / "c.yaml"
    # YAML 1.1 reads 3e-3 as a string: floats still take it; anchors without aliases are fine
    f.write_text("train: &t\n  epochs: 3\n  lr: 3e-3\n  num_threads: null\n  model:\n    use_context: false\n"
                 "gates:\n  positive_rate_range: [0.0, 1.0]\n  max_regression: 0\n")
    config = RetrainConfig.from_file(f)
    assert (config.train.epochs, config.train.lr, config.train.num_threads) == (3, 0.003, None)
    assert config.train.future_targets == "auto"  # a named choice beside a whole number survives the strict check
    assert RetrainConfig.model_validate({"train": {"refit": True}}).train.refit is True
    with pytest.raises(ValidationError, match="must be true or false, got 1"):  # refit is auto, true or false
        RetrainConfig.model_validate({"train": {"refit": 1}})
    assert RetrainConfig.model_validate({"train": {"future_targets": 2}}).train.future_targets == 2
    from towerflow.commands.retrain import load_config

    assert load_config(None).train.future_targets == "auto"  # the CLI's defaults, dumped and validated again
    assert config.train.model.use_context is False and config.gates.max_regression == 0.0
    assert config.gates.positive_rate_range == (0.0, 1.0)
    import numpy as np

    assert WorldConfig(n_users=np.int64(5)).n_users == 5  # numpy whole numbers are whole numbers


def test_a_partial_ranker_train_keeps_the_stages_own_defaults():
    # RankerStageConfig.train's default differs from RankerTrainConfig() (S = 32, the retrieval score, weight 2):
    # naming one key must not reset the others to the class defaults (S = 100, no retrieval score, weight 0)
    stage = RetrainConfig.model_validate({"ranker": {"train": {"epochs": 5}}}).ranker.train
    assert stage.epochs == 5
    assert (stage.model.max_seq_len, stage.model.retrieval_score, stage.model.retrieval_weight) == (32, True, 2.0)
    stage = RetrainConfig.model_validate({"ranker": {"train": {"model": {"max_seq_len": 100}}}}).ranker.train
    assert (stage.epochs, stage.model.max_seq_len, stage.model.retrieval_weight) == (3, 100, 2.0)
    # a plain dict value is replaced whole, not merged: click alone means click alone, and a dump validates back
    config = RetrainConfig.model_validate({"ranker": {"train": {"model": {"score_weights": {"click": 1.0}}}}})
    assert config.ranker.train.model.score_weights == {"click": 1.0}
    assert RetrainConfig.model_validate(config.model_dump(mode="json")) == config
    with pytest.raises(ValidationError, match="set retrieval_weight: 0 as well"):
        RetrainConfig.model_validate({"ranker": {"train": {"model": {"retrieval_score": False}}}})
    with pytest.raises(ValidationError, match="ranker.train.model.max_seq_lenn"):
        RetrainConfig.model_validate({"ranker": {"train": {"model": {"max_seq_lenn": 100}}}})
