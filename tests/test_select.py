"""select_layers.py on a tiny teacher with one planted layer that a linear mixer cannot replace."""

import contextlib
import json
import os
import shutil

import pytest
import torch

import select_layers
from hybrid.checkpoint import atomic_torch_save
from hybrid.model.spec import with_softmax
from hybrid.repeats import repeated_batches
from hybrid.selection import (SpecSwitcher, halving_ranking, halving_schedule, jaccard, parse_candidates, rank_layers,
                              uniform_layers)
from hybrid.shards import val_batches
from hybrid.stage2 import held_out_kl, teacher_targets
from hybrid.student import seed_from
from hybrid.surgery import build_student, read_spec
from hybrid.teacher import load_teacher
from tests.conftest import launch

PLANTED = 2  # the teacher layer whose sharp, strong softmax attention no linear mixer reproduces
SETTINGS = dict(SEQ_LEN=32, MICRO_BATCH=2, TOTAL_BATCH_TOKENS=64, CANDIDATE_TOKENS=64 * 8, EVAL_BATCHES=2, KS=[1, 2],
                FRACTION=0.25, LR_MIXER=5e-4, LR=5e-4, WARMUP_STEPS=1, LOG_EVERY=4, KL_CHUNK_TOKENS=32, SEED=1337,
                EARLY_FRAC=0.25, HALVING_FRAC=0.33, SET_TOKENS=0, TEMPERATURE=1.0, PRIMARY="ga_s2", SMOKE=False,
                TEACHER="", METHODS=("ga_s2,zero_shot,halving,early,uniform,mse,greedy,ablation,retrieval,ga_s2_retrieval,"
                                            "zero_shot_retrieval"),
                RETRIEVAL_PROMPTS=3, RETRIEVAL_LEN=64, RETRIEVAL_KEEP=0.2)
# selection.json schema (docs/selection.md): top-level key -> type; per-method key -> type
TOP_KEYS = {"schema_version": int, "init": str, "teacher": str, "n_layers": int, "stage1_spec": list,
            "candidates": list, "primary": str, "ks": list, "fraction": float, "k_fraction": int, "chosen": list,
            "chosen_spec": list, "methods": dict, "settings": dict, "world_size": int, "wall_seconds": float,
            "env": dict}
METHOD_KEYS = {"scores": (dict, type(None)), "spread": (dict, type(None)), "direction": (str, type(None)),
               "ranking": (list, type(None)), "ranks": (dict, type(None)), "top": dict, "train_tokens": int,
               "eval_tokens": int, "job_seconds": float, "n_jobs": int, "extra": dict, "set_kl": dict,
               "jaccard": dict, "wall_seconds": float, "token_ratio": float}


@pytest.fixture(scope="module")
def planted(tiny_setup, tmp_path_factory):
    """A teacher whose layer PLANTED has sharp attention and a strong output (the other layers'
    attention is weak), sharp logits, and an untrained all-gdn "stage-1" checkpoint for it."""
    root = tmp_path_factory.mktemp("planted")
    teacher, tok = load_teacher(tiny_setup["model"])
    with torch.no_grad():
        teacher.model.norm.weight.mul_(4.0)  # sharper next-token distributions: KL differences visible
        for i, layer in enumerate(teacher.model.layers):
            layer.self_attn.o_proj.weight.mul_(10.0 if i == PLANTED else 0.1)
        teacher.model.layers[PLANTED].self_attn.q_proj.weight.mul_(3.0)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    spec = ["gdn"] * 4
    student = build_student(teacher, spec)
    config = {"teacher": str(root / "teacher"), "hybrid_spec": spec, "untied": False, "stage": 1,
              "resolved": {"TARGET": "layer"}}
    atomic_torch_save({"model": student.state_dict(), "config": config, "step": 0}, str(root / "s1/ckpt/final.pt"))
    return {"init": str(root / "s1"), "teacher": str(root / "teacher"), "data": tiny_setup["data"]}


def configure(monkeypatch, planted, run_dir, **kw):
    for name, value in {**SETTINGS, "INIT": planted["init"], "DATA_DIR": planted["data"], "RUN_DIR": str(run_dir),
                        **kw}.items():
        assert hasattr(select_layers, name), name
        monkeypatch.setattr(select_layers, name, value)


@pytest.fixture(scope="module")
def selected(planted, tmp_path_factory):
    run = tmp_path_factory.mktemp("select")
    mp = pytest.MonkeyPatch()
    configure(mp, planted, run)
    result = select_layers.main()
    mp.undo()
    return str(run), result


def test_planted_layer_is_ranked_first(selected):
    _, sel = selected
    methods = sel["methods"]
    for m in ("ga_s2", "early", "zero_shot", "halving", "ablation", "greedy"):
        assert methods[m]["ranking"][0] == PLANTED, (m, methods[m]["ranking"], methods[m]["scores"])
    ga = {int(l): v for l, v in methods["ga_s2"]["scores"].items()}
    others = [v for l, v in ga.items() if l != PLANTED]
    assert ga[PLANTED] < 0.85 * min(others), ga  # a clear margin, not a tie broken by layer index
    assert sel["chosen"] == [PLANTED] and sel["k_fraction"] == 1
    assert sel["chosen_spec"] == with_softmax(["gdn"] * 4, [PLANTED])
    # training closes part of the others' gap, not all of it, in this budget
    zs = {int(l): v for l, v in methods["zero_shot"]["scores"].items()}
    assert all(ga[l] < zs[l] for l in ga if l != PLANTED), (ga, zs)


def test_selection_json_schema_and_costs(selected):
    run, sel = selected
    with open(os.path.join(run, "selection.json")) as f:
        disk = json.load(f)
    assert disk == json.loads(json.dumps(sel))
    for key, typ in TOP_KEYS.items():
        assert isinstance(disk[key], typ), (key, type(disk[key]))
    assert set(disk) == set(TOP_KEYS)
    assert set(disk["methods"]) == set(SETTINGS["METHODS"].split(","))
    for m, r in disk["methods"].items():
        assert set(r) == set(METHOD_KEYS), (m, set(r) ^ set(METHOD_KEYS))
        for key, typ in METHOD_KEYS.items():
            assert isinstance(r[key], typ), (m, key, type(r[key]))
        assert set(r["top"]) == set(r["jaccard"]) == set(r["set_kl"]) == {"1", "2"}
        assert all(0.0 <= j <= 1.0 for j in r["jaccard"].values())
        if r["scores"] is not None:
            assert sorted(map(int, r["scores"])) == disk["candidates"] and r["direction"] in ("lower", "higher")
            assert sorted(r["ranking"]) == disk["candidates"]
    full = 4 * 8 * 64
    assert disk["methods"]["ga_s2"]["train_tokens"] == full and disk["methods"]["ga_s2"]["jaccard"] == {"1": 1.0, "2": 1.0}
    assert disk["methods"]["early"]["train_tokens"] == full // 4
    assert 0 < disk["methods"]["halving"]["train_tokens"] <= full / 3
    for m in ("zero_shot", "uniform", "mse", "greedy", "ablation", "retrieval"):
        assert disk["methods"][m]["train_tokens"] == 0
    # retrieval: every head's hit rate on the MQAR prompts; ga_s2_retrieval: the layers at >= RETRIEVAL_KEEP (0.2) first,
    # then GA-S2's ranking, on GA-S2's runs (read back from disk, not trained again)
    heads = disk["methods"]["retrieval"]["extra"]["head_hit_rate"]
    assert len(heads) == 4 and all(len(h) == 4 and all(0 <= x <= 1 for x in h) for h in heads)
    rs = {int(l): v for l, v in disk["methods"]["retrieval"]["scores"].items()}
    assert rs == pytest.approx({l: max(h) for l, h in enumerate(heads)}, abs=1e-4)
    assert disk["methods"]["retrieval"]["extra"]["answer_positions"] == 3 * 3  # 3 prompts of 3 pairs at 64 tokens
    kept = sorted((l for l in rs if rs[l] >= 0.2), key=lambda l: -rs[l])
    assert kept and disk["methods"]["ga_s2"]["ranking"][:len(kept)] != kept  # the keep rule changes the order here
    gr = disk["methods"]["ga_s2_retrieval"]
    assert gr["extra"]["kept"] == kept and gr["ranking"] == kept + [l for l in disk["methods"]["ga_s2"]["ranking"]
                                                                    if l not in kept]
    assert gr["train_tokens"] == full
    zr = disk["methods"]["zero_shot_retrieval"]  # the same kept layers, then zero-shot's ranking: nothing trained
    assert zr["extra"]["kept"] == kept and zr["ranking"] == kept + [l for l in disk["methods"]["zero_shot"]["ranking"]
                                                                    if l not in kept]
    assert zr["train_tokens"] == 0 and zr["eval_tokens"] > disk["methods"]["retrieval"]["eval_tokens"]
    assert gr["wall_seconds"] < disk["methods"]["ga_s2"]["wall_seconds"] / 2  # GA-S2's runs read back, not trained again
    assert disk["methods"]["uniform"]["top"] == {"1": [2], "2": [1, 3]}
    assert len(disk["methods"]["greedy"]["extra"]["kl_after_removal"]) == 3
    with open(os.path.join(run, "selection.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    files = set(os.listdir(os.path.join(run, "candidates")))
    assert {f"ga_s2_layer_{l:02d}.json" for l in range(4)} <= files
    assert not any(f.endswith(".tmp") for f in files)


def test_primary_ga_s2_retrieval_is_compared_with_ga_s2(selected, planted, tmp_path, monkeypatch, capsys):
    """distill.sh's default primary: chosen follows it, while every Jaccard and token ratio stays GA-S2's
    (the method the cheap selectors stand in for); the candidates are read back, not trained again."""
    run, sel = selected
    shutil.copytree(run, tmp_path / "run")
    configure(monkeypatch, planted, tmp_path / "run", PRIMARY="ga_s2_retrieval")
    again = select_layers.main()
    m, k = again["methods"], str(again["k_fraction"])
    assert again["primary"] == "ga_s2_retrieval" and again["chosen"] == m["ga_s2_retrieval"]["top"][k]
    assert m["ga_s2_retrieval"]["top"] != m["ga_s2"]["top"]  # (the keep rule changes the order on the planted teacher)
    for name, r in m.items():
        assert r["jaccard"] == {kk: jaccard(r["top"][kk], m["ga_s2"]["top"][kk]) for kk in r["top"]}, name
    assert m["ga_s2"]["jaccard"] == {"1": 1.0, "2": 1.0} and m["ga_s2_retrieval"]["jaccard"] != m["ga_s2"]["jaccard"]
    assert {n: r["top"] for n, r in m.items()} == {n: r["top"] for n, r in sel["methods"].items()}
    kept = m["ga_s2_retrieval"]["extra"]["kept"]  # more copy layers than K = 1: said, with the way out
    assert len(kept) >= 1 and "so its top 1 holds no layer of GA-S2's; raise --retrieval_keep" in capsys.readouterr().out


def test_zero_shot_retrieval_alone_trains_no_candidate(planted, tmp_path, monkeypatch, capsys):
    """The cheap selection (`SELECT=zero_shot_retrieval ./distill.sh`): without ga_s2 in METHODS no candidate is
    trained, the order is the copy layers then zero-shot's, and the Jaccards are taken against the primary."""
    run = tmp_path / "run"
    configure(monkeypatch, planted, run, METHODS="zero_shot,retrieval,zero_shot_retrieval",
              PRIMARY="zero_shot_retrieval")
    sel = select_layers.main()
    m, k = sel["methods"], str(sel["k_fraction"])
    assert set(m) == {"zero_shot", "retrieval", "zero_shot_retrieval"} and sel["primary"] == "zero_shot_retrieval"
    assert all(r["train_tokens"] == 0 for r in m.values())
    assert not any(f.startswith(("ga_s2_", "early_")) for f in os.listdir(run / "candidates"))
    zr, rs = m["zero_shot_retrieval"], {int(l): v for l, v in m["retrieval"]["scores"].items()}
    kept = sorted((l for l in rs if rs[l] >= SETTINGS["RETRIEVAL_KEEP"]), key=lambda l: -rs[l])
    assert zr["extra"]["kept"] == kept and zr["ranking"] == kept + [l for l in m["zero_shot"]["ranking"] if l not in kept]
    assert sel["chosen"] == zr["top"][k] and zr["jaccard"] == {kk: 1.0 for kk in zr["top"]}
    assert m["zero_shot"]["jaccard"] == {kk: jaccard(m["zero_shot"]["top"][kk], zr["top"][kk]) for kk in zr["top"]}
    assert len(kept) >= sel["k_fraction"] == 1  # more copy layers than K: the way out is said, naming the fill
    out = capsys.readouterr().out
    assert "so its top 1 holds no layer of zero-shot's; raise --retrieval_keep" in out
    assert "tokens and Jaccards against zero_shot_retrieval (the primary; GA-S2 did not run)" in out  # the table says


def test_distill_reads_the_chosen_spec(selected):
    run, sel = selected
    assert read_spec(os.path.join(run, "selection.json"), 4) == sel["chosen_spec"]
    # selection.json:<method>: that method's top-K (K = k_fraction) turned softmax, for comparison arms
    k = str(sel["k_fraction"])
    for method in ("uniform", "ga_s2", "mse"):
        top = sel["methods"][method]["top"][k]
        want = ["softmax" if i in top else m for i, m in enumerate(sel["stage1_spec"])]
        assert read_spec(os.path.join(run, "selection.json") + ":" + method, 4) == want
    assert read_spec(os.path.join(run, "selection.json") + ":ga_s2", 4) == sel["chosen_spec"]  # the primary
    with pytest.raises(ValueError, match=r"no top-\d+ set for method 'nope'; it has: .*uniform"):
        read_spec(os.path.join(run, "selection.json") + ":nope", 4)
    # :<method>@K: the top K of the method's ranking (uniform: K spread evenly), whatever K it listed
    ranking = sel["methods"]["ga_s2"]["ranking"]
    for k in (1, 2, 3):
        got = read_spec(os.path.join(run, "selection.json") + f":ga_s2@{k}", 4)
        assert [i for i, m in enumerate(got) if m == "softmax"] == sorted(ranking[:k])
    assert read_spec(os.path.join(run, "selection.json") + ":uniform@2", 4).count("softmax") == 2
    for bad in ("ga_s2@0", "ga_s2@x", "ga_s2@9"):
        with pytest.raises(ValueError, match="expected a number of softmax layers"):
            read_spec(os.path.join(run, "selection.json") + ":" + bad, 4)


def test_rerun_skips_finished_candidates(selected, planted, tmp_path, monkeypatch):
    run, sel = selected
    rerun = tmp_path / "rerun"
    shutil.copytree(run, rerun)
    os.remove(rerun / "candidates" / "ga_s2_layer_01.json")
    calls = {"train": [], "eval": 0}
    real_train, real_eval = select_layers.train_spec, select_layers.eval_spec

    def counting_train(ctx, spec, *a, **kw):
        calls["train"].append(spec)
        return real_train(ctx, spec, *a, **kw)

    def counting_eval(ctx, spec):
        calls["eval"] += 1
        return real_eval(ctx, spec)

    monkeypatch.setattr(select_layers, "train_spec", counting_train)
    monkeypatch.setattr(select_layers, "eval_spec", counting_eval)
    configure(monkeypatch, planted, rerun)
    again = select_layers.main()
    assert calls == {"train": [with_softmax(["gdn"] * 4, [1])], "eval": 0}
    assert again["methods"]["ga_s2"]["scores"] == sel["methods"]["ga_s2"]["scores"]  # recomputed bit-exactly
    calls["train"].clear()
    select_layers.main()
    assert calls == {"train": [], "eval": 0}
    monkeypatch.setattr(select_layers, "LOG_EVERY", 1)  # on the explicit list of settings that change no result
    select_layers.main()
    assert calls == {"train": [], "eval": 0}
    monkeypatch.setattr(select_layers, "LR_MIXER", 3e-3)
    with pytest.raises(ValueError, match="other settings"):
        select_layers.main()
    # every setting not on that list keys the results, also one nobody thought of (the old hand-kept
    # allow-list lacked the KL chunk size)
    monkeypatch.setattr(select_layers, "LR_MIXER", SETTINGS["LR_MIXER"])
    monkeypatch.setattr(select_layers, "KL_CHUNK_TOKENS", 16)
    with pytest.raises(ValueError, match=r"other settings \(\['KL_CHUNK_TOKENS'\]\)"):
        select_layers.main()


def test_init_run_redone_with_other_settings_refuses_stored_results(planted, tmp_path, monkeypatch):
    """The --init run's own settings key the stored results: its checkpoint rewritten in place by a run with another
    learning rate makes the next selection in the same run dir an error naming that setting; the same settings
    under another RUN_DIR of the --init (a copy of the run elsewhere) reuse them."""
    init, run = tmp_path / "s1", tmp_path / "select"
    shutil.copytree(planted["init"], init)
    final = init / "ckpt" / "final.pt"
    ckpt = torch.load(final, weights_only=False)
    ckpt["config"]["resolved"] = {"TARGET": "layer", "LR": 1e-3, "RUN_DIR": "runs/a/stage1"}
    torch.save(ckpt, final)
    quick = dict(METHODS="zero_shot", PRIMARY="zero_shot", SEQ_LEN=128, TOTAL_BATCH_TOKENS=256, CANDIDATE_TOKENS=256)
    configure(monkeypatch, planted, run, INIT=str(init), **quick)
    first = select_layers.main()["methods"]["zero_shot"]["scores"]
    stored = json.loads(next((run / "candidates").glob("kl_*.json")).read_text())["key"]
    assert stored["INIT.LR"] == 1e-3 and stored["INIT.TARGET"] == "layer" and "INIT.RUN_DIR" not in stored
    ckpt["config"]["resolved"]["RUN_DIR"] = "runs/b/stage1"  # a setting that changes no result: reused
    torch.save(ckpt, final)
    written = {p.name: p.stat().st_mtime_ns for p in (run / "candidates").glob("kl_*.json")}
    assert select_layers.main()["methods"]["zero_shot"]["scores"] == first
    assert {p.name: p.stat().st_mtime_ns for p in (run / "candidates").glob("kl_*.json")} == written  # not rewritten
    ckpt["config"]["resolved"]["LR"] = 3e-3
    torch.save(ckpt, final)
    with pytest.raises(ValueError, match=r"other settings \(\['INIT.LR'\]\)"):
        select_layers.main()


def stage1_switcher(planted):
    """The planted teacher, its stage-1 checkpoint and a SpecSwitcher over the checkpoint's all-gdn student."""
    teacher, _ = load_teacher(planted["teacher"])
    ckpt = torch.load(os.path.join(planted["init"], "ckpt", "final.pt"), weights_only=False)
    base = build_student(teacher, ckpt["config"]["hybrid_spec"])
    base.load_state_dict(ckpt["model"])
    return teacher, ckpt, SpecSwitcher(base, teacher, ["gdn"] * 4)


def test_val_repeats_scores_on_rows_with_repeats(planted, tmp_path, monkeypatch):
    """VAL_REPEATS: every KL is scored on the val rows repeated_batches gives (checked against a direct score),
    and the setting keys the stored results (rows of >= 64 tokens: shorter ones get no repeats)."""
    quick = dict(METHODS="zero_shot", PRIMARY="zero_shot", SEQ_LEN=128, TOTAL_BATCH_TOKENS=256, CANDIDATE_TOKENS=256)
    configure(monkeypatch, planted, tmp_path / "rep", **quick, VAL_REPEATS=1.0)
    rep = select_layers.main()["methods"]["zero_shot"]["scores"]
    configure(monkeypatch, planted, tmp_path / "plain", **quick, VAL_REPEATS=0.0)
    plain = select_layers.main()["methods"]["zero_shot"]["scores"]
    teacher, _, switcher = stage1_switcher(planted)
    cpu = torch.device("cpu")
    for val, scores in ((val_batches(planted["data"], 2, 128, 2), plain),
                        (repeated_batches(val_batches(planted["data"], 2, 128, 2), 1.0, SETTINGS["SEED"]), rep)):
        h = teacher_targets(teacher, val, cpu)
        for layer in range(4):
            r = held_out_kl(switcher.set(with_softmax(["gdn"] * 4, [layer])), teacher, val, cpu,
                            contextlib.nullcontext(), h_teacher=h)
            assert scores[str(layer)] == pytest.approx(r["val_kl"], rel=1e-5)
    assert all(abs(rep[k] - plain[k]) > 1e-4 * plain[k] for k in plain)
    configure(monkeypatch, planted, tmp_path / "rep", **quick, VAL_REPEATS=0.5)
    with pytest.raises(ValueError, match=r"other settings \(\['VAL_REPEATS'\]\)"):
        select_layers.main()


def test_switcher_scores_match_a_seeded_student(planted):
    teacher, ckpt, switcher = stage1_switcher(planted)
    val = val_batches(planted["data"], 2, 32, 2)
    h = teacher_targets(teacher, val, torch.device("cpu"))
    for spec in (with_softmax(["gdn"] * 4, [1]), with_softmax(["gdn"] * 4, [0, 3]), ["gdn"] * 4):
        seeded = build_student(teacher, spec)
        seed_from(seeded, ckpt["model"], ["gdn"] * 4, spec)
        cpu, plain = torch.device("cpu"), contextlib.nullcontext()
        a = held_out_kl(switcher.set(spec), teacher, val, cpu, plain, h_teacher=h)
        b = held_out_kl(seeded, teacher, val, cpu, plain, h_teacher=h)
        assert a["val_kl_per_batch"] == b["val_kl_per_batch"] and a["val_kl"] > 0
    with pytest.raises(ValueError, match="stage-1 mixer"):
        switcher.set(["gla"] * 4)


def test_rankings_halving_and_jaccard():
    assert rank_layers({0: 0.3, 1: 0.1, 2: 0.2}, higher_is_better=False) == [1, 2, 0]
    assert rank_layers({0: 0.3, 1: 0.1, 2: 0.2}, higher_is_better=True) == [0, 2, 1]
    assert uniform_layers(list(range(30)), 4) == [3, 11, 18, 26]
    assert uniform_layers(list(range(30)), 8) == [1, 5, 9, 13, 16, 20, 24, 28]
    assert jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3) and jaccard([], []) == 1.0
    linear = [0, 1, 3, 4, 5, 7]  # layers 2 and 6 already softmax
    assert parse_candidates("all", linear) == linear
    assert parse_candidates("spread:3", linear) == [1, 4, 7] and parse_candidates("spread:9", linear) == linear
    assert parse_candidates("5, 1", linear) == [1, 5]
    for bad in ("spread:0", "spread:x", "first"):
        with pytest.raises(ValueError, match="--candidates"):
            parse_candidates(bad, linear)
    for n, full in ((30, 128), (4, 8), (24, 64)):
        sched = halving_schedule(n, full, 0.33)
        assert sched[0][0] == n and sched[-1][0] == 2
        assert all(b[1] == 2 * a[1] for a, b in zip(sched, sched[1:]))
        assert sum(c * s for c, s in sched) <= 0.33 * n * full
    with pytest.raises(ValueError, match="HALVING_FRAC"):
        halving_schedule(30, 4, 0.33)
    rounds = [{0: 0.5, 1: 0.2, 2: 0.3, 3: 0.1}, {3: 0.25, 1: 0.15}]
    assert halving_ranking(rounds) == [1, 3, 2, 0]


def test_bad_inputs_are_named(planted, tmp_path, monkeypatch):
    configure(monkeypatch, planted, tmp_path, METHODS="ga_s2,magic")
    with pytest.raises(ValueError, match="magic"):
        select_layers.main()
    configure(monkeypatch, planted, tmp_path, KS=[2, 8], METHODS="zero_shot", PRIMARY="zero_shot")
    with pytest.raises(ValueError, match="candidate"):
        select_layers.main()


def _cli(planted, run_dir, nproc):
    settings = {**SETTINGS, "METHODS": "ga_s2,zero_shot,greedy,ablation", "INIT": planted["init"],
                "DATA_DIR": planted["data"], "RUN_DIR": str(run_dir), "CANDIDATE_TOKENS": 64 * 4}
    args = [f"--{k.lower()}={v}" for k, v in settings.items()]
    out = launch("select_layers.py", args, nproc)
    errors = "\n".join(line for line in out.stderr.splitlines() if "[rank1]" in line or "Error" in line)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + "\nerror lines:\n" + errors[-4000:]
    with open(run_dir / "selection.json") as f:
        return json.load(f)


@pytest.mark.slow
def test_two_processes_match_one(planted, tmp_path):
    one, two = _cli(planted, tmp_path / "one", 1), _cli(planted, tmp_path / "two", 2)
    assert one["world_size"] == 1 and two["world_size"] == 2
    ranks = {json.load(open(tmp_path / "two" / "candidates" / f))["rank"]
             for f in os.listdir(tmp_path / "two" / "candidates")}
    assert ranks == {0, 1}  # both ranks did candidates
    for m in ("ga_s2", "zero_shot", "greedy", "ablation"):
        a, b = one["methods"][m], two["methods"][m]
        # float noise (another reduction order with 2 processes) may only swap near-tied layers
        swaps = [(x, y) for x, y in zip(a["ranking"], b["ranking"]) if x != y]
        assert all(a["scores"][str(x)] == pytest.approx(a["scores"][str(y)], rel=1e-4, abs=1e-6) for x, y in swaps), \
            (m, a["ranking"], b["ranking"], a["scores"])
        for layer in a["scores"]:
            assert a["scores"][layer] == pytest.approx(b["scores"][layer], rel=1e-5, abs=1e-7), (m, layer)
    assert one["chosen_spec"] == two["chosen_spec"]


def test_candidates_built_on_the_device_equal_the_checkpoint_rebuild(planted, tmp_path, monkeypatch):
    """SpecSwitcher.copy (GA-S2's candidates) copies the resident stage-1 student; it must hold exactly
    what rebuilding from the CPU teacher + seed_from(stage-1 checkpoint) gives, sharing no storage."""
    from hybrid.checkpoint import load_checkpoint
    from hybrid.config import config_dict
    from hybrid.student import Artifact, rebuild_student
    ckpt = load_checkpoint(planted["init"])
    torch.manual_seed(0)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    atomic_torch_save({**ckpt, "model": state}, str(tmp_path / "s1/ckpt/final.pt"))
    configure(monkeypatch, {**planted, "init": str(tmp_path / "s1")}, tmp_path / "run")
    ctx = select_layers.setup(config_dict(vars(select_layers)), torch.device("cpu"), torch.float32)
    art = Artifact.from_config(ckpt["config"], planted["init"]).replace(teacher=ctx["teacher_dir"])
    teacher_ref = load_teacher(ctx["teacher_dir"], dtype=torch.float32, device="cpu")[0]
    for layer in (0, PLANTED):
        spec = with_softmax(ctx["stage1_spec"], [layer])
        got = ctx["switcher"].copy(spec)
        want = rebuild_student(art.replace(hybrid_spec=spec), teacher_ref)
        seed_from(want, state, ctx["stage1_spec"], spec)
        got_state, want_state = got.state_dict(), want.state_dict()
        assert set(got_state) == set(want_state)
        for k in want_state:
            assert torch.equal(got_state[k], want_state[k]), k
        assert got.training and all(p.requires_grad for p in got.parameters())
        resident = {p.data_ptr() for p in ctx["switcher"].student.parameters()}
        assert not resident & {p.data_ptr() for p in got.parameters()}
