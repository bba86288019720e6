"""`hone cluster simulate`: the DP against brute force, valid shapes only, no failures = ideal,
checkpoint-restart loss against its analytic value, traces, seeds, bad JOBS.toml, the CLI."""

import json
import math
import random

import pytest

from hone.errors import HoneError
from hone.heal.cluster_policies import best_allocation, brute_force
from hone.heal.failures import FailureEvent, RepairTime, generate, load_trace
from hone.heal.jobs import Job, curve, jobs_from_dict, load_jobs
from hone.heal.simulate import BUCKETS, run_policy, simulate
from hone.plan.shapes import PRESETS
from tiny_runs import hone_process

M = PRESETS["hone-125m"]
TINY = "layers=2,hidden=64,heads=4,kv_heads=4,ffn=128,vocab=256"
ALL = ["checkpoint-restart", "naive-elastic", "cost-aware"]


def _job(name, weight=1.0, **kw):
    return Job(name=name, model=M, seq=2048, global_batch=64, weight=weight, **kw)


def _run(policy, jobs, curves, initial, failures, *, nodes, end_h, mtbf_h=math.inf, budgets=None):
    return run_policy(jobs, curves, initial, budgets or [math.inf] * len(jobs), policy=policy, n_nodes=nodes,
                      gpus_per_node=1, failures=failures, end_s=end_h * 3600, gpu_mtbf_h=mtbf_h)


# ---- the dynamic program --------------------------------------------------------------------------

def test_dp_hand_checked_case():
    values = [{1: 10.0, 2: 15.0, 3: 16.0}, {1: 8.0, 2: 9.0}]
    # A on 2 + B on 1 = 23 beats A on 3 (16), A on 1 + B on 2 (19) and A on 1 + B on 1 (18).
    assert best_allocation(values, 3, [0, 0]) == (23.0, [2, 1])
    assert best_allocation(values, 1, [0, 0]) == (10.0, [1, 0])
    assert best_allocation(values, 0, [0, 0]) == (0.0, [0, 0])


def test_dp_equals_brute_force_on_random_cases():
    rng = random.Random(7)
    for _ in range(300):
        jobs, cap = rng.randint(1, 4), rng.randint(0, 9)
        values = [{n: rng.uniform(0, 10) for n in rng.sample(range(1, 10), rng.randint(1, 5))} for _ in range(jobs)]
        current = [rng.choice([0] + sorted(v)) for v in values]
        val, alloc = best_allocation(values, cap, current)
        ref, _ = brute_force(values, cap)
        assert val == pytest.approx(ref, rel=1e-12, abs=1e-12)
        assert sum(alloc) <= cap and all(n == 0 or n in values[j] for j, n in enumerate(alloc))
        assert sum(values[j].get(n, 0.0) for j, n in enumerate(alloc)) == pytest.approx(val)


def test_dp_keeps_current_allocation_on_ties():
    values = [{1: 5.0, 2: 5.0}, {1: 5.0, 2: 5.0}]
    assert best_allocation(values, 4, [2, 0])[1][0] == 2  # no pointless move off the current count


# ---- valid shapes ----------------------------------------------------------------------------------

def test_curve_has_only_valid_parallel_shapes():
    from hone.plan.hardware import parse_preset
    from hone.plan.search import search
    from hone.plan.shapes import load_shape

    # 4 heads, 2 layers, batch 4: 3 or 5 GPUs admit no tp (heads), pp (layers) or dp (batch) split.
    job = jobs_from_dict({"job": [{"name": "t", "model": TINY, "seq": 128, "global_batch": 4}]}, "x")[0]
    c = curve(job, "H100", 1, 8)
    assert sorted(c) == [1, 2, 4, 8]
    for n in c:
        best = search(load_shape(TINY), parse_preset(f"{n}x1xH100"), 128, 4, top=1).plans[0]
        assert best["tp"] * best["pp"] * best["dp"] == n and best["fits"]


def test_policies_only_allocate_valid_shapes():
    jobs = [_job("a", 4.0), _job("b", 1.0)]
    curves = [{1: 10.0, 2: 20.0, 4: 40.0}, {1: 10.0, 2: 19.0, 4: 36.0, 6: 50.0}]
    failures = generate(10, 1, 20, 40.0, seed=3, repair=RepairTime("exp:6"), hardware_fraction=0.8)
    assert len(failures) > 50
    for p in ALL:
        r = _run(p, jobs, curves, [4, 6], failures, nodes=10, end_h=20 * 24, mtbf_h=40.0)
        for e in r["events"]:
            if "nodes_to" in e and e["nodes_to"]:
                assert e["nodes_to"] in curves[0 if e["job"] == "a" else 1], (p, e)
        assert r["accounting_error"] < 1e-9


# ---- no failures, analytic loss -----------------------------------------------------------------

def test_no_failures_every_policy_reaches_the_ideal(tmp_path):
    (tmp_path / "jobs.toml").write_text(
        '[[job]]\nname = "a"\nmodel = "hone-1b"\nseq = 2048\nglobal_batch = 64\nweight = 3\nmax_gpus = 4\n'
        '[[job]]\nname = "b"\nmodel = "hone-125m"\nseq = 2048\nglobal_batch = 64\n')
    (tmp_path / "empty.csv").write_text("time_h,node,kind,repair_h\n")
    res = simulate(load_jobs(tmp_path / "jobs.toml"), n_gpus=8, gpus_per_node=1, days=5, policies=ALL, seeds=[0, 1],
                   trace=tmp_path / "empty.csv")
    assert [j["initial_nodes"] for j in res["jobs"]] == [4, 4]
    for r in res["runs"]:
        assert r["weighted_flops"] == pytest.approx(res["ideal_weighted_flops"], rel=1e-12)
        assert r["gpu_hours"]["lost"] == pytest.approx(0.0, abs=1e-9)
        assert r["reconfigurations"] == 0


def test_checkpoint_restart_matches_the_exact_accounting_of_one_failure():
    tau, C, R = 3600.0, 60.0, 600.0
    job = _job("a", checkpoint_s=C, restart_s=R, checkpoint_interval_s=tau)
    fail = [FailureEvent(2.5 * 3600, node=0, kind="hardware", repair_s=3600.0)]
    r = _run("checkpoint-restart", [job], [{2: 100.0}], [2], fail, nodes=2, end_h=12)
    # Fails 9000 s in: two full cycles (2 * 3660 s) done, 1680 s lost; waits 1 h for the repair
    # (the other node idle), restarts (600 s), then 30000 s = 8 cycles + 720 s of training.
    g = r["gpu_hours"]
    assert g["rollback"] == pytest.approx(2 * 1680 / 3600)
    assert g["down"] == pytest.approx(1.0) and g["idle"] == pytest.approx(1.0)
    assert g["restart"] == pytest.approx(2 * R / 3600)
    assert g["checkpoint"] == pytest.approx(2 * (2 + 8) * C / 3600)
    assert r["tokens"]["a"] == pytest.approx(100.0 * (2 * tau + 8 * tau + 720))
    assert r["accounting_error"] < 1e-12


def test_checkpoint_restart_rollback_matches_expected_half_interval():
    # Poisson failures with MTBF >> interval land uniformly within a cycle: E[rollback] = (tau + C) / 2.
    tau, C, R = 600.0, 60.0, 120.0
    job = _job("a", checkpoint_s=C, restart_s=R, checkpoint_interval_s=tau)
    mtbf_h = 50 * (tau + C) / 3600
    fails = generate(1, 1, 1500, mtbf_h, seed=1, repair=RepairTime("const:0"), hardware_fraction=0.0)
    r = _run("checkpoint-restart", [job], [{1: 1.0}], [1], fails, nodes=1, end_h=1500 * 24, mtbf_h=mtbf_h)
    hits = r["failures"]["hit_jobs"]
    assert hits > 3000
    assert r["gpu_hours"]["rollback"] * 3600 / hits == pytest.approx((tau + C) / 2, rel=0.04)
    # A failure during a restart cuts it short: E[restart] = MTBF * (1 - exp(-R / MTBF)).
    m = mtbf_h * 3600
    assert r["gpu_hours"]["restart"] * 3600 / hits == pytest.approx(m * (1 - math.exp(-R / m)), rel=0.02)


def test_young_daly_interval_from_the_mtbf():
    job = _job("a", checkpoint_s=60.0, restart_s=0.0)
    fail = [FailureEvent(10.0, node=0, kind="transient", repair_s=0.0)]
    r = _run("checkpoint-restart", [job], [{4: 1.0}], [4], fail, nodes=4, end_h=1, mtbf_h=1000.0)
    # tau = sqrt(2 * C * MTBF_job), MTBF_job = 1000 h / 4 GPUs.
    tau = math.sqrt(2 * 60.0 * 1000 * 3600 / 4)
    assert r["gpu_hours"]["checkpoint"] == pytest.approx(4 * 60.0 * int((3600 - 10) // (tau + 60)) / 3600)


# ---- the policies differ where they should ----------------------------------------------------------

def test_cost_aware_moves_a_node_to_the_heavy_job_and_naive_shrinks():
    jobs = [_job("heavy", 10.0, restart_s=60.0), _job("light", 1.0, restart_s=60.0)]
    curves = [{1: 10.0, 2: 20.0}, {1: 10.0, 2: 20.0}]
    fail = [FailureEvent(3600.0, node=0, kind="hardware", repair_s=10 * 3600.0)]
    res = {p: _run(p, jobs, curves, [2, 2], fail, nodes=4, end_h=24, mtbf_h=1e6) for p in ALL}
    at = lambda p: [row for row in res[p]["timeline"] if row[0] == 1.0][-1][1:]  # noqa: E731
    assert at("checkpoint-restart") == [0, 2]  # heavy waits for the repair
    assert at("naive-elastic") == [1, 2]       # heavy shrinks to what it has left
    assert at("cost-aware") == [2, 1]          # light gives heavy a node
    w = {p: res[p]["weighted_flops"] for p in ALL}
    assert w["cost-aware"] > w["naive-elastic"] > w["checkpoint-restart"]
    assert res["checkpoint-restart"]["gpu_hours"]["idle"] == pytest.approx(10.0)


def test_budget_finish_frees_nodes_for_cost_aware_only():
    jobs = [_job("short"), _job("long")]
    curves = [{1: 10.0, 2: 20.0}, {1: 10.0, 2: 20.0, 4: 40.0}]
    budgets = [20.0 * 3600 * 2, math.inf]  # short finishes after 2 h on 2 nodes
    out = {p: _run(p, jobs, curves, [2, 2], [], nodes=4, end_h=10, budgets=budgets) for p in ALL}
    for p in ALL:
        assert out[p]["finished_h"] == {"short": pytest.approx(2.0)}
    assert out["checkpoint-restart"]["gpu_hours"]["idle"] == pytest.approx(2 * 8.0)
    assert out["cost-aware"]["timeline"][-1][1:] == [0, 4]
    assert out["cost-aware"]["gpu_hours"]["idle"] == 0.0


# ---- traces and seeds --------------------------------------------------------------------------------

def _jobs_file(tmp_path):
    p = tmp_path / "jobs.toml"
    p.write_text('[defaults]\nrestart_s = 300\n'
                 '[[job]]\nname = "a"\nmodel = "hone-1b"\nseq = 2048\nglobal_batch = 64\nweight = 2\nmax_gpus = 4\n'
                 '[[job]]\nname = "b"\nmodel = "hone-125m"\nseq = 2048\nglobal_batch = 64\nmax_gpus = 4\n')
    return p


def test_trace_csv_and_jsonl_reproduce(tmp_path):
    (tmp_path / "t.csv").write_text("time_h,node,kind,repair_h\n# a "
                                    "comment\n5,1,hardware,3\n9.5,6,transient,\n30,2,hardware,\n")
    (tmp_path / "t.jsonl").write_text('{"time_h": 5, "node": 1, "kind": "hardware", "repair_h": 3}\n'
                                      '{"time_h": 9.5, "node": 6, "kind": "transient"}\n{"time_h": 30, "node": 2}\n')
    jobs = load_jobs(_jobs_file(tmp_path))
    kw = dict(n_gpus=8, gpus_per_node=1, days=2, policies=ALL, seeds=[4])
    a = simulate(jobs, trace=tmp_path / "t.csv", **kw)
    b = simulate(jobs, trace=tmp_path / "t.csv", **kw)
    c = simulate(jobs, trace=tmp_path / "t.jsonl", **kw)
    assert json.dumps(a["runs"]) == json.dumps(b["runs"]) == json.dumps(c["runs"])
    fails = [e for e in a["runs"][0]["events"] if e["event"].endswith("failure")]
    assert [(e["t_h"], e["node"], e["event"]) for e in fails] == [
        (5.0, 1, "hardware failure"), (9.5, 6, "transient failure"), (30.0, 2, "hardware failure")]
    assert fails[0]["repair_h"] == 3.0


def test_same_seed_same_result_other_seed_other_failures(tmp_path):
    jobs = load_jobs(_jobs_file(tmp_path))
    kw = dict(n_gpus=8, gpus_per_node=1, days=20, policies=ALL, mtbf_h=300.0)
    a, b = simulate(jobs, seeds=[11], **kw), simulate(jobs, seeds=[11], **kw)
    assert json.dumps(a) == json.dumps(b)
    c = simulate(jobs, seeds=[12], **kw)
    assert a["runs"][0]["events"] != c["runs"][0]["events"]


def test_llama3_calibration():
    from hone.heal.failures import LLAMA3_CLUSTER_MTBF_H, LLAMA3_GPU_MTBF_H

    assert LLAMA3_CLUSTER_MTBF_H == pytest.approx(3.09, abs=0.01)
    # 54 days on 16,384 GPUs at the calibrated per-GPU MTBF: ~419 failures.
    n = [len(generate(16384, 8, 54, LLAMA3_GPU_MTBF_H, s, RepairTime("const:1"))) for s in range(5)]
    assert 419 * 0.9 < sum(n) / len(n) < 419 * 1.1
    assert LLAMA3_GPU_MTBF_H == pytest.approx(LLAMA3_CLUSTER_MTBF_H * 16384)


# ---- bad input ------------------------------------------------------------------------------------------

GOOD = {"name": "a", "model": "hone-125m", "seq": 2048, "global_batch": 64}


@pytest.mark.parametrize("change, expect", [
    ({"seq": 0}, "jobs.toml: job[0] (a).seq: must be at least 1 (got 0)"),
    ({"global_batch": "64"}, "job[0] (a).global_batch: must be an integer (got '64')"),
    ({"weight": -1}, "job[0] (a).weight: must be greater than 0 (got -1)"),
    ({"model": "gpt-9000"}, "job[0] (a).model: unknown model 'gpt-9000'"),
    ({"modle": "x"}, "job[0] (a).modle: unknown field"),
    ({"min_gpus": 16, "max_gpus": 8}, "job[0] (a).max_gpus: 8 is below min_gpus 16"),
    ({"tokens": 1e9, "hours": 3}, "job[0] (a).hours: give tokens or hours, not both"),
    ({"name": ""}, "job[0].name: must be a non-empty string"),
])
def test_bad_job_fields_name_file_and_field(change, expect):
    with pytest.raises(HoneError) as e:
        jobs_from_dict({"job": [{**GOOD, **change}]}, "jobs.toml")
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_bad_files_and_traces_name_the_place(tmp_path):
    with pytest.raises(HoneError, match=r"jobs.toml: job\[0\] \(a\).seq: required field missing"):
        jobs_from_dict({"job": [{"name": "a", "model": "hone-125m", "global_batch": 1}]}, "jobs.toml")
    with pytest.raises(HoneError, match=r"job\[1\].name: duplicate job name 'a'"):
        jobs_from_dict({"job": [GOOD, GOOD]}, "jobs.toml")
    with pytest.raises(HoneError, match="no jobs"):
        jobs_from_dict({}, "jobs.toml")
    t = tmp_path / "t.csv"
    t.write_text("time_h,node,kind\n1,99,hardware\n")
    with pytest.raises(HoneError, match=r"t.csv:2: node: 99 is not below the cluster's 8 nodes"):
        load_trace(t, 8, 1, 1, RepairTime("const:1"), 0)
    t.write_text("time_h,node,kind\n# comment\n\n1,0,broken\n")
    with pytest.raises(HoneError, match=r"t.csv:4: kind: must be hardware or transient"):
        load_trace(t, 8, 1, 1, RepairTime("const:1"), 0)
    j = tmp_path / "t.jsonl"
    j.write_text('{"time_h": 1, "node": 0}\n{"time_h": -2, "node": 0}\n')
    with pytest.raises(HoneError, match=r"t.jsonl:2: time_h: must be a non-negative number \(got -2\)"):
        load_trace(j, 8, 1, 1, RepairTime("const:1"), 0)


def _hone(*args):
    return hone_process(*args, check=False)


def test_cli_end_to_end_and_one_line_errors(tmp_path):
    jobs = _jobs_file(tmp_path)
    out = tmp_path / "sim"
    p = _hone("cluster", "simulate", "--jobs", str(jobs), "--gpus", "8", "--gpus-per-node", "1", "--days", "10",
              "--mtbf", "200", "--seeds", "2", "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)["summary"]
    assert set(summary) == set(ALL) and "cost_aware_ratio" in summary["naive-elastic"]
    full = json.loads((out / "simulation.json").read_text())
    assert len(full["runs"]) == 6 and all(r["accounting_error"] < 1e-9 for r in full["runs"])
    assert set(full["runs"][0]["gpu_hours"]) == {*BUCKETS, "lost", "total"}
    assert (out / "cluster_sim.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*tmp"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[job]]\nname = "a"\nmodel = "hone-125m"\nseq = 2048\nglobal_batch = 64\nweight = "high"\n')
    p = _hone("cluster", "simulate", "--jobs", str(bad), "--gpus", "8", "--mtbf", "llama3", "--out", str(out))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert p.stderr.startswith(f"error: {bad}: job[0] (a).weight: must be a number") and "Traceback" not in p.stderr
    from typer.testing import CliRunner

    from hone.cli import app

    r = CliRunner().invoke(app, ["cluster", "simulate", "--jobs", str(jobs), "--gpus", "8", "--out", str(out)])
    assert isinstance(r.exception, HoneError) and "--trace FILE or --mtbf" in str(r.exception)


def test_hours_budget_and_inline_model_table(tmp_path):
    jobs = jobs_from_dict({"job": [
        {"name": "a", "model": {"layers": 4, "hidden": 256, "heads": 4, "vocab": 1000}, "seq": 512,
         "global_batch": 16, "hours": 2, "max_gpus": 2},
        {"name": "b", "model": "hone-125m", "seq": 2048, "global_batch": 64, "max_gpus": 2}]}, "jobs.toml")
    assert jobs[0].model.layers == 4 and jobs[0].model.ffn == 1024
    (tmp_path / "empty.csv").write_text("time_h,node\n")
    res = simulate(jobs, n_gpus=4, gpus_per_node=1, days=1, policies=ALL, seeds=[0], trace=tmp_path / "empty.csv")
    for r in res["runs"]:
        assert r["finished_h"] == {"a": pytest.approx(2.0)}
        assert r["weighted_flops"] <= res["ideal_weighted_flops"] * (1 + 1e-12)


def test_cluster_group_has_simulate_with_help():
    import typer.main
    from typer.testing import CliRunner

    from hone.cli import app

    assert sorted(typer.main.get_command(app).commands["cluster"].commands) == ["simulate"]
    result = CliRunner().invoke(app, ["cluster", "simulate", "--help"])
    assert result.exit_code == 0 and "--mtbf" in result.output and "--policy" in result.output


def test_random_clusters_account_for_every_gpu_second():
    rng = random.Random(0)
    for it in range(100):
        nodes, nj = rng.randint(1, 12), rng.randint(1, 4)
        jobs = [_job(f"j{i}", rng.uniform(0.1, 5), checkpoint_s=rng.uniform(1, 300), restart_s=rng.uniform(0, 900),
                     checkpoint_interval_s=rng.choice([None, rng.uniform(60, 7200)])) for i in range(nj)]
        curves = [{n: rng.uniform(1, 100) * n for n in rng.sample(range(1, nodes + 1), rng.randint(1, nodes))}
                  for _ in range(nj)]
        initial, cap = [], nodes
        for c in curves:
            initial.append(max([k for k in c if k <= cap], default=0))
            cap -= initial[-1]
        budgets = [rng.choice([math.inf, rng.uniform(1e4, 1e7)]) for _ in range(nj)]
        days, mtbf = rng.uniform(0.5, 10), rng.uniform(1, 200) * nodes
        rep = RepairTime(rng.choice(["const:2", "exp:5", "lognormal:3,1", "const:0"]))
        fails = generate(nodes, 1, days, mtbf, it, rep, rng.random())
        for p in ALL:
            r = run_policy(jobs, curves, initial, budgets, policy=p, n_nodes=nodes, gpus_per_node=1, failures=fails,
                           end_s=days * 86400, gpu_mtbf_h=mtbf)
            assert r["accounting_error"] < 1e-9 and min(r["gpu_hours"][b] for b in BUCKETS) > -1e-9
            assert all(r["tokens"][j.name] <= budgets[i] * (1 + 1e-12) for i, j in enumerate(jobs))
            for e in r["events"]:
                if e.get("nodes_to"):
                    assert e["nodes_to"] in curves[int(e["job"][1:])]
