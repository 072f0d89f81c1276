"""The sweep-space schema: shipped files, Tune search setup, trial decoding, and bad files.

No Ray cluster is started: grid spaces are checked as data, and the Optuna searchers are
driven in-process through ``suggest`` / ``on_trial_complete`` as Tune would drive them.
"""

from __future__ import annotations

import copy
import pickle
import socket
from pathlib import Path

import pytest
import yaml

from peft_engine.methods import METHODS, MethodSpec
from peft_engine.tuners.lora.config import LoraConfig
from sweeps.gate_rules import merge_rules, regressions
from sweeps.space import SpaceError, SweepSpec, TrialParams, load_space, parse_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"
BAD = Path(__file__).resolve().parent / "bad_spaces"

MINIMAL = {"base": {"model": "tiny-random-llama"}, "data": {"source": "chatterbot-corpus"}, "space": {"method": "lora"}}


def make(**sections) -> dict:
    data = copy.deepcopy(MINIMAL)
    for key, value in sections.items():
        data[key] = value if not isinstance(value, dict) or key == "space" else {**data.get(key, {}), **value}
    return data


def drive(spec: SweepSpec, n: int, loss=lambda i, cfg: 1.0 / (i + 1)) -> list[dict]:
    """Ask the spec's searcher for ``n`` configs, completing each trial as Tune would."""
    param_space, limiter = spec.tune_search()
    assert param_space == {}
    searcher = limiter.searcher  # the ConcurrencyLimiter would hold back trials past max_concurrent
    out = []
    for i in range(n):
        cfg = searcher.suggest(f"t{i}")
        out.append(cfg)
        searcher.on_trial_complete(f"t{i}", {spec.search.metric: loss(i, cfg), "training_iteration": 1})
    return out


# ---- shipped spaces -----------------------------------------------------------------------
def test_every_shipped_space_is_covered():
    shipped = {p.stem for p in SPACES.glob("*.yaml")}
    covered = {"smoke", "quickstart", "gpu_llama8b_qlora", "nightly", "methods_tour", "prompt_vs_lora"}
    assert shipped == covered, "add new shipped spaces to test_shipped_spaces_parse_offline"


def test_every_engine_method_appears_in_a_shipped_space():
    from peft_engine.methods import METHODS

    named = set()
    for path in SPACES.glob("*.yaml"):
        named |= {t for t in _methods_named(load_space(path))}
    assert set(METHODS) <= named, sorted(set(METHODS) - named)


def _methods_named(spec) -> set[str]:
    axis = spec.space.method
    return {axis} if isinstance(axis, str) else {m for values in axis.values() for m in values}


@pytest.mark.parametrize(("name", "trials", "algorithm"), [("smoke", 4, "grid"), ("quickstart", 6, "random"),
                                                           ("gpu_llama8b_qlora", 24, "optuna"), ("nightly", 2, "grid"),
                                                           ("methods_tour", 14, "grid"), ("prompt_vs_lora", 3, "grid")])
def test_shipped_spaces_parse_offline(name, trials, algorithm, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("validation must not touch the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    spec = load_space(SPACES / f"{name}.yaml")
    assert spec.search.algorithm == algorithm
    assert spec.count_trials() == trials
    assert spec.registry.model_name and "/" not in spec.registry.model_name


def test_smoke_is_the_documented_four_trial_grid():
    spec = load_space(SPACES / "smoke.yaml")
    param_space, search_alg = spec.tune_search()
    assert search_alg is None
    grid = param_space["params"]["grid_search"]
    labels = sorted(spec.trial_params({"params": cfg}).label() for cfg in grid)
    assert labels == ["dora r=2 attention", "dora r=4 attention", "lora r=2 attention", "lora r=4 attention"]
    assert spec.train.max_steps == 8 and spec.train.eval_every == 4 and spec.search.scheduler.type == "none"
    assert spec.tune_config_kwargs()["max_concurrent_trials"] == 1


def test_gpu_space_values():
    spec = load_space(SPACES / "gpu_llama8b_qlora.yaml")
    assert spec.base.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert spec.space.axes["quantization"].values == ("nf4",)
    assert (spec.resources.workers, spec.resources.gpus_per_worker) == (4, 1)


# ---- defaults and coercions ---------------------------------------------------------------
def test_defaults_follow_the_source_and_the_metric():
    spec = parse_space(make())
    assert spec.name == "sweep" and spec.registry.model_name == "sweep-adapter"
    assert spec.search.mode == "min" and spec.search.num_samples == 4
    assert parse_space(make(), source="dir/my-sweep.yaml").name == "my-sweep"
    seq = parse_space(make(base={"task": "seq_cls"}, search={"metric": "f1"}))
    assert seq.search.mode == "max"
    assert parse_space(make(search={"algorithm": "grid"})).search.num_samples == 1


def test_epochs_replaces_the_max_steps_default_and_strings_become_numbers():
    spec = parse_space(make(train={"epochs": 2}, space={"method": "lora", "learning_rate": "2e-4"}))
    assert spec.train.max_steps is None and spec.train.epochs == 2
    assert spec.space.axes["learning_rate"].values == (2e-4,)  # YAML 1.1 reads 2e-4 as a string


def test_train_warmup_and_weight_decay_feed_the_space_axes():
    spec = parse_space(make(train={"warmup_ratio": 0.1}, space={"method": "lora", "weight_decay": {"choice": [0.0, 0.01]}}))
    params = spec.trial_params({"method": "lora", "weight_decay": 0.01})
    assert params.warmup_ratio == 0.1 and params.weight_decay == 0.01


def test_local_paths_hub_ids_and_fixed_mapping_values(tmp_path):
    data_file, gguf, model_dir = tmp_path / "rows.jsonl", tmp_path / "m.gguf", tmp_path / "model"
    data_file.write_text('{"prompt": "a", "response": "b"}\n')
    gguf.write_bytes(b"GGUF")
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    for model in (str(gguf), str(model_dir), "gpt2", "org/some.model-v2"):
        parse_space(make(base={"model": model}, data={"source": str(data_file)}))
    with pytest.raises(SpaceError, match="no config.json"):
        parse_space(make(base={"model": str(tmp_path)}))
    with pytest.raises(SpaceError, match="unsupported type"):
        parse_space(make(data={"source": str(gguf)}))
    spec = parse_space(make(space={"method": "lora", "methods": {"lora": {"rank_pattern": {"q_proj": 4}}}}))
    assert spec.trial_params({}).hyperparameters == {"rank_pattern": {"q_proj": 4}}  # a mapping that is no distribution


# ---- grid ---------------------------------------------------------------------------------
def test_grid_enumerates_the_conditional_product():
    data = make(search={"algorithm": "grid", "num_samples": 2}, space={
        "method": {"grid": ["lora", "dora"]}, "targets": {"grid": ["attention", ["q_proj", "v_proj"]]},
        "methods": {"lora": {"r": {"grid": [2, 4, 8]}, "lora_dropout": 0.1}, "dora": {"r": {"choice": [4]}}}})
    spec = parse_space(data)
    grid = spec.tune_search()[0]["params"]["grid_search"]
    assert len(grid) == (3 + 1) * 2 and spec.count_trials() == 16  # num_samples repeats the whole grid
    assert all(("lora.r" in c) == (c["method"] == "lora") and ("dora.r" in c) == (c["method"] == "dora") for c in grid)
    assert len({repr(sorted(c.items())) for c in grid}) == len(grid)
    params = [spec.trial_params({"params": c}) for c in grid]
    assert {p.hyperparameters.get("lora_dropout") for p in params if p.method == "lora"} == {0.1}
    assert ["q_proj", "v_proj"] in [p.targets for p in params]


def test_prompt_methods_do_not_multiply_the_grid_by_targets():
    spec = parse_space(make(search={"algorithm": "grid"}, space={
        "method": {"grid": ["lora", "prompt_tuning"]}, "targets": {"grid": ["attention", "mlp"]},
        "methods": {"prompt_tuning": {"num_virtual_tokens": {"grid": [4, 8]}}}}))
    assert spec.count_trials() == 2 + 2


# ---- optuna define-by-run -----------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["random", "optuna"])
def test_searcher_samples_method_hyperparameters_only_for_the_picked_method(algorithm):
    data = yaml.safe_load((SPACES / "quickstart.yaml").read_text())
    data["search"].update(algorithm=algorithm, num_samples=12)
    data["space"]["targets"] = {"choice": ["attention", ["q_proj", "v_proj"], ".*mlp.*_proj"]}
    spec = parse_space(data, "q.yaml")
    configs = drive(spec, 12)
    assert {c["method"] for c in configs} == {"lora", "dora"}
    for cfg in configs:
        other = "dora" if cfg["method"] == "lora" else "lora"
        assert f"{cfg['method']}.r" in cfg and not any(k.startswith(other + ".") for k in cfg)
        assert cfg["targets"] in ("attention", ["q_proj", "v_proj"], ".*mlp.*_proj")  # the trial sees decoded values
        params = spec.trial_params(cfg)
        assert params.method == cfg["method"] and params.hyperparameters["r"] == cfg[f"{cfg['method']}.r"]
        assert params.targets in ("attention", ["q_proj", "v_proj"], ".*mlp.*_proj")  # lists decoded, not JSON
        assert 1e-4 <= params.learning_rate <= 1e-3 and params.quantization in ("none", "nf4")
    assert ["q_proj", "v_proj"] in [spec.trial_params(c).targets for c in configs]


@pytest.mark.parametrize("algorithm", ["random", "optuna"])
def test_searcher_is_reproducible_from_the_seed(algorithm):
    def configs(seed: int) -> list[dict]:
        data = yaml.safe_load((SPACES / "quickstart.yaml").read_text())
        data["search"].update(algorithm=algorithm, seed=seed, num_samples=8)
        return drive(parse_space(data), 8, loss=lambda i, cfg: cfg["learning_rate"] * 1000)

    assert configs(3) == configs(3)
    assert configs(3) != configs(4)


def test_searcher_pickles_and_limits_concurrency():
    data = make(search={"algorithm": "optuna", "max_concurrent": 2}, space={"method": "lora", "learning_rate": {"loguniform": [1e-4, 1e-3]}})
    spec = parse_space(data)
    _, limiter = spec.tune_search()
    assert limiter.max_concurrent == 2
    pickle.loads(pickle.dumps(limiter.searcher._space))  # Tune checkpoints the searcher
    assert pickle.loads(pickle.dumps(spec)).count_trials() == spec.count_trials()


def test_pbt_uses_flat_domains_and_mutates_the_learning_rate():
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = parse_space(make(search={"algorithm": "random", "scheduler": {"type": "pbt"}},
                            space={"method": "lora", "learning_rate": {"loguniform": [1e-4, 1e-3]}, "methods": {"lora": {"r": {"choice": [4, 8]}}}}))
    param_space, alg = spec.tune_search()
    assert isinstance(alg, BasicVariantGenerator)
    assert set(param_space) >= {"method", "learning_rate", "lora.r"}
    assert set(spec.pbt_mutations()) == {"learning_rate"}


# ---- trial params -------------------------------------------------------------------------
def test_trial_params_flat_and_label():
    spec = load_space(SPACES / "quickstart.yaml")
    cfg = {"method": "lora", "targets": ["q_proj", "v_proj"], "quantization": "nf4", "learning_rate": 3e-4,
           "warmup_ratio": 0.0, "weight_decay": 0.0, "lora.r": 16, "lora.lora_dropout": 0.05}
    params = spec.trial_params(cfg)
    assert isinstance(params, TrialParams)
    assert params.hyperparameters == {"r": 16, "lora_alpha": 16, "lora_dropout": 0.05}  # fixed lora_alpha applied
    flat = params.flat()
    assert flat["method"] == "lora" and flat["r"] == 16 and flat["lora_alpha"] == 16
    assert flat["targets"] == "q_proj,v_proj" and flat["quantization"] == "nf4" and flat["learning_rate"] == 3e-4
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    assert params.label().startswith("lora r=16 q_proj+v_proj nf4")
    assert "lr=0.0003" in params.label()
    with pytest.raises(AttributeError):
        params.method = "dora"  # frozen
    encoded = spec.trial_params({**cfg, "targets": '["q_proj", "v_proj"]'})  # Optuna's categorical form
    assert encoded.targets in (["q_proj", "v_proj"], '["q_proj", "v_proj"]')


def test_trial_params_rejects_configs_from_another_space():
    spec = load_space(SPACES / "quickstart.yaml")
    with pytest.raises(ValueError, match="lora.r"):
        spec.trial_params({"method": "lora", "targets": "attention", "quantization": "none", "learning_rate": 1e-4})
    with pytest.raises(ValueError, match="allowed: lora, dora"):
        spec.trial_params({"method": "ia3"})


# ---- methods come from the engine ---------------------------------------------------------
def test_new_methods_need_no_schema_change_and_quantized_bases_is_enforced(monkeypatch):
    monkeypatch.setitem(METHODS, "plainlora", MethodSpec("plainlora", LoraConfig, quantized_bases=False))
    spec = parse_space(make(space={"method": "plainlora", "methods": {"plainlora": {"r": 2}}}))
    assert spec.trial_params({}).hyperparameters == {"r": 2}
    with pytest.raises(SpaceError, match=r"space\.quantization = \['none', 'nf4'\].*plainlora.*allowed with plainlora: 'none'"):
        parse_space(make(space={"method": {"choice": ["lora", "plainlora"]}, "quantization": {"choice": ["none", "nf4"]}}))


def test_dependent_hyperparameters_validate_together():
    ok = make(space={"method": "lora", "methods": {"lora": {"layers_to_transform": [0, 1], "layers_pattern": "layers"}}})
    parse_space(ok)
    with pytest.raises(SpaceError, match=r"space\.methods\.lora\.layers_pattern = 'layers'"):
        parse_space(make(space={"method": "lora", "methods": {"lora": {"layers_pattern": "layers"}}}))
    with pytest.raises(SpaceError, match=r"space\.method = 'prompt_tuning'.*num_virtual_tokens"):
        parse_space(make(space={"method": "prompt_tuning"}))


def test_every_problem_is_reported_at_once():
    data = make(train={"batch_size": 0}, search={"metric": "accuracy"},
                space={"method": "lora", "quantization": "int4", "methods": {"lora": {"r": 0, "lora_alpha": -1}}})
    with pytest.raises(SpaceError) as info:
        parse_space(data, "many.yaml")
    assert len(info.value.problems) == 4  # batch_size, quantization, r, lora_alpha (metric needs valid sections)
    for path in ("train.batch_size", "space.quantization", "space.methods.lora.r", "space.methods.lora.lora_alpha"):
        assert path in str(info.value)


# ---- platform-derived hyperparameters ----------------------------------------------------
def test_adalora_total_step_comes_from_max_steps_unless_set():
    spec = parse_space(make(train={"max_steps": 30}, space={"method": "adalora", "methods": {"adalora": {"tinit": {"choice": [0, 5]}}}}))
    params = spec.trial_params({"method": "adalora", "adalora.tinit": 5})
    assert params.hyperparameters == {"tinit": 5, "total_step": 30} and params.flat()["total_step"] == 30
    METHODS["adalora"].build_config(**params.hyperparameters)
    mine = parse_space(make(space={"method": "adalora", "methods": {"adalora": {"total_step": 500, "tinit": 100}}}))
    assert mine.trial_params({}).hyperparameters == {"total_step": 500, "tinit": 100}  # max_steps 20 would reject tinit 100


def test_adalora_with_epochs_validates_with_a_placeholder_and_leaves_total_step_to_the_worker():
    spec = parse_space(make(train={"epochs": 1}, space={"method": "adalora"}))
    assert "total_step" not in spec.trial_params({}).hyperparameters  # only the worker knows the step count
    with pytest.raises(SpaceError, match=r"tinit = 2000: .*total_step = 1000 is set by the platform, a placeholder"):
        parse_space(make(train={"epochs": 1}, space={"method": "adalora", "methods": {"adalora": {"tinit": 2000}}}))


def test_an_invalid_train_section_is_not_blamed_on_the_method():
    with pytest.raises(SpaceError) as info:  # tinit 50 fits the placeholder; max_steps is unknown, not 20
        parse_space(make(train={"batch_size": 0}, space={"method": "adalora", "methods": {"adalora": {"tinit": 50}}}))
    assert len(info.value.problems) == 1 and "train.batch_size" in info.value.problems[0]


# ---- registry gate ------------------------------------------------------------------------
def test_thresholds_merge_with_the_search_metric_and_check_the_task():
    spec = load_space(SPACES / "nightly.yaml")
    assert spec.gate_rules() == {"eval_loss": 0.01, "perplexity": 0.5}
    assert parse_space(make(registry={"promotion_threshold": 0.2})).gate_rules() == {"eval_loss": 0.2}
    seq = parse_space(make(base={"task": "seq_cls"}, search={"metric": "f1"}, registry={"thresholds": {"accuracy": "2e-2"}}))
    assert seq.gate_rules() == {"f1": 0.0, "accuracy": 0.02}
    assert merge_rules("eval_loss", 0.3, {"eval_loss": 0.1}) == {"eval_loss": 0.1}
    with pytest.raises(SpaceError, match=r"registry\.promotion_threshold = 0\.2: thresholds\.eval_loss = 0\.1.*allowed: the same value"):
        parse_space(make(registry={"promotion_threshold": 0.2, "thresholds": {"eval_loss": 0.1}}))
    with pytest.raises(SpaceError, match=r"registry\.thresholds\.loss = 1: unknown metric \(did you mean 'eval_loss'\?\)"):
        parse_space(make(registry={"thresholds": {"loss": 1}}))


GATE_CASES = [  # candidate, champion, rules, metrics that regress
    ({"eval_loss": 1.0}, {"eval_loss": 1.0}, {"eval_loss": 0.0}, []),  # equal is not worse
    ({"eval_loss": 1.005}, {"eval_loss": 1.0}, {"eval_loss": 0.01}, []),  # within the slack
    ({"eval_loss": 1.01}, {"eval_loss": 1.0}, {"eval_loss": 0.01}, []),  # exactly the slack (1.01 - 1.0 > 0.01 in floats)
    ({"eval_loss": 1.02}, {"eval_loss": 1.0}, {"eval_loss": 0.01}, ["eval_loss"]),
    ({"eval_loss": 2.1531 + 1.02e-7}, {"eval_loss": 2.1531}, {"eval_loss": 0.0}, []),  # a rerun's rounding: a tie
    ({"eval_loss": 2.1531 + 1e-4}, {"eval_loss": 2.1531}, {"eval_loss": 0.0}, ["eval_loss"]),
    ({"accuracy": 0.85 - 1e-4}, {"accuracy": 0.85}, {"accuracy": 0.0}, ["accuracy"]),
    ({"eval_loss": 0.5}, {"eval_loss": 1.0}, {"eval_loss": 0.0}, []),  # lower is better
    ({"accuracy": 0.80}, {"accuracy": 0.85}, {"accuracy": 0.01}, ["accuracy"]),  # higher is better
    ({"accuracy": 0.90}, {"accuracy": 0.85}, {"accuracy": 0.0}, []),
    ({"accuracy": 0.845}, {"accuracy": 0.85}, {"accuracy": 0.01}, []),
    ({"f1": 0.7}, {"f1": 0.8}, {"f1": 0.1}, []),
    ({"eval_loss": 0.9, "perplexity": 12.0}, {"eval_loss": 1.0, "perplexity": 11.0}, {"eval_loss": 0.01, "perplexity": 0.5},
     ["perplexity"]),  # a better search metric does not excuse another one
    ({"eval_loss": 1.2, "perplexity": 12.0}, {"eval_loss": 1.0, "perplexity": 11.0}, {"eval_loss": 0.01, "perplexity": 0.5},
     ["eval_loss", "perplexity"]),
    ({"eval_loss": 2.0, "perplexity": 7.0}, {"eval_loss": 1.0, "perplexity": 7.0}, {"perplexity": 0.0}, []),  # unlisted: not gated
    ({"eval_loss": float("nan")}, {"eval_loss": 1.0}, {"eval_loss": 10.0}, ["eval_loss"]),  # diverged
    ({"eval_loss": 1.0}, {"eval_loss": float("nan")}, {"eval_loss": 0.0}, []),
]


@pytest.mark.parametrize(("candidate", "champion", "rules", "failing"), GATE_CASES)
def test_regressions(candidate, champion, rules, failing):
    lines = regressions(candidate, champion, rules)
    assert [line.split(":")[0] for line in lines] == failing
    assert all("allowed: at most" in line and "better" in line for line in lines)


def test_regressions_refuses_metrics_it_cannot_compare():
    with pytest.raises(ValueError, match="champion metrics have no 'perplexity'"):
        regressions({"perplexity": 1.0}, {"eval_loss": 1.0}, {"perplexity": 0.1})
    with pytest.raises(ValueError, match="no known direction; allowed: eval_loss"):
        regressions({"bleu": 1.0}, {"bleu": 1.0}, {"bleu": 0.1})


# ---- bad files ----------------------------------------------------------------------------
BAD_CASES = {
    "unknown_top_key": ["trainig", "unknown key", "did you mean 'train'", "allowed keys: name, base, data"],
    "wrong_type": ["train.batch_size = 'four'", "allowed: an integer >= 1"],
    "unknown_method": ["space.method = 'lorra'", "unknown method", "did you mean 'lora'", "allowed: ", "dora"],
    "unknown_hyperparameter": ["space.methods.lora.rank", "unknown hyperparameter of lora", "allowed: ", "lora_alpha"],
    "bad_hyperparameter_value": ["space.methods.lora.r = 0 (choice candidate 0)", "allowed: an integer > 0"],
    "grid_with_loguniform": ["space.learning_rate = {loguniform:", "algorithm grid cannot enumerate", "{choice: [..]}"],
    "random_with_grid": ["space.methods.lora.r = {grid: [4, 8]}", "grid needs search.algorithm: grid", "allowed with random: {choice: [..]}"],
    "metric_mode_mismatch": ["search.mode = 'max'", "eval_loss is minimized", "allowed: 'min'"],
    "negative_lr_bound": ["space.learning_rate = {'loguniform': [-0.0001, 0.001]}", "0 < lo < hi"],
    "unknown_quantization": ["space.quantization = 'int4'", "allowed: none, int8, nf4, fp4"],
    "fractional_gpus": ["resources.gpus_per_worker = 1.5", "allowed: 0, a fraction in (0, 1) or a whole number"],
    "eval_every_gt_max_steps": ["train.eval_every = 10", "max_steps = 8", "allowed: an integer in [1, 8]"],
    "yaml_syntax_error": ["YAML syntax error", "allowed: valid YAML"],
    "empty": ["the file is empty", "allowed: a mapping with sections"],
    "pbt_with_grid": ["search.scheduler.type = 'pbt' with algorithm grid", "allowed: algorithm random with pbt"],
    "steps_and_epochs": ["train.max_steps = 10, epochs = 2.0", "set exactly one", "allowed: max_steps: N or epochs: X"],
    "bad_targets": ["space.targets = 'atention'", "allowed: a preset (attention, mlp, all-linear)"],
    "duplicate_key": ["space.method", "duplicate key"],
    "bare_list_axis": ["space.learning_rate = [0.0001, 0.0002]", "allowed: {choice: [0.0001, 0.0002]}"],
    "methods_not_on_axis": ["space.methods.dora", "not on the method axis", "allowed: lora"],
    "missing_space": ["space: is required", "allowed: a mapping with keys method, targets"],
    "top_level_list": ["top level = [", "allowed: a mapping with sections"],
    "missing_data_file": ["data.source = './no_such_data.jsonl'", "no such file", "allowed: chatterbot-corpus"],
    "distribution_typo": ["space.methods.lora.lora_alpha", "did you mean 'choice'", "allowed: a fixed value or one of"],
    "int_hparam_uniform": ["space.methods.lora.r = 4.0 (uniform lo)", "an integer > 0", "{randint: [lo, hi]}"],
    "unknown_base": ["base.model = 'smollm2'", "did you mean 'smollm2-135m-instruct'", "allowed: a packaged base"],
    "perplexity_seq_cls": ["search.metric = 'perplexity'", "allowed: eval_loss, accuracy, f1"],
    "threshold_other_task": ["registry.thresholds.accuracy = 0.02", "does not compute accuracy for task causal_lm",
                             "allowed: eval_loss, perplexity"],
    "negative_threshold": ["registry.thresholds.perplexity = -0.5", "allowed: a number >= 0"],
    "adalora_steps": ["space.methods.adalora.tinit = 50", "total_step=20", "from train.max_steps", "allowed: tinit < total_step - tfinal"],
}
# The line the first problem must point at, found by a text the line contains.
BAD_LINES = {"bad_hyperparameter_value": "r: {choice", "unknown_top_key": "trainig:", "fractional_gpus": "gpus_per_worker",
             "random_with_grid": "r: {grid", "duplicate_key": "method: dora", "yaml_syntax_error": "methods:",
             "threshold_other_task": "accuracy:", "negative_threshold": "perplexity:", "adalora_steps": "tinit:"}


def test_every_bad_file_has_a_case():
    assert sorted(p.stem for p in BAD.glob("*.yaml")) == sorted(BAD_CASES)
    assert len(BAD_CASES) >= 12


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_space_is_rejected_with_file_field_and_allowed(name):
    path = BAD / f"{name}.yaml"
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for expected in BAD_CASES[name]:
        assert expected in message, f"{expected!r} not in:\n{message}"
    for problem in info.value.problems:
        assert problem.startswith(str(path)) and "allowed" in problem, problem
    if name in BAD_LINES:
        line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if BAD_LINES[name] in text)
        assert info.value.problems[0].startswith(f"{path}:{line}:"), info.value.problems[0]


def test_space_error_pickles():
    with pytest.raises(SpaceError) as info:
        load_space(BAD / "wrong_type.yaml")
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.problems == info.value.problems


def test_missing_file_lists_the_neighbours(tmp_path):
    (tmp_path / "real.yaml").write_text("{}")
    with pytest.raises(SpaceError, match=r"no such file.*real\.yaml"):
        load_space(tmp_path / "typo.yaml")


def test_validating_and_unpickling_a_space_does_not_import_torch():
    """The driver validates the space before any Ray resource starts, and the actors that only
    relay trials (the trial function, the job board, Ray Train's controller) unpickle it and
    decode trial configs: none of that may pay seconds for torch or transformers."""
    import subprocess
    import sys

    code = (
        "import pickle, sys\n"
        "from sweeps.space import load_space\n"
        "load_space('search_spaces/quickstart.yaml')\n"
        "spec = pickle.loads(pickle.dumps(load_space('search_spaces/smoke.yaml')))\n"
        "grid = spec.tune_search()[0]['params']['grid_search']\n"
        "params = spec.trial_params({'params': grid[0]})\n"
        "print(params.method, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["lora", "[]"]
