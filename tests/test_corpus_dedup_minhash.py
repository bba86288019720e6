"""MinHash LSH near-dedup: shingles match the reference, recall/precision on injected copies,
clusters, resume after a kill gives identical output."""

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from hone.corpus.executor import LocalExecutor
from hone.corpus.minhash import WORD_RE, MinHasher, collision_probability, jaccard, lsh_params
from hone.corpus.steps.dedup import NearDedupConfig, near_dedup

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega river stone cloud field light sound paper glass metal water").split()


def _doc(rng, n=120):
    return " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n))


def _mutate(rng, text, frac):
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, int(frac * len(words)))):
        words[i] = f"changed{rng.randrange(10**6)}"
    return " ".join(words)


def _ref_shingles(text, n=5):
    w = WORD_RE.findall(text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)} if len(w) >= n else ({tuple(w)} if w else set())


def test_shingles_match_python_reference():
    rng = random.Random(0)
    texts = [_doc(rng, rng.randrange(0, 30)) for _ in range(50)] + ["Hello, World! héllo wörld", "a b", ""]
    h, off = MinHasher().shingles(texts)
    for i, t in enumerate(texts):
        assert len(np.unique(h[off[i]:off[i + 1]])) == len(_ref_shingles(t)), t
    # case and punctuation do not matter; word order does
    a, b, c = (MinHasher().shingles([t])[0] for t in ("One two, three four FIVE six", "one two three four five six",
                                                     "six five four three two one"))
    assert set(a) == set(b) and not set(a) & set(c)


def test_signature_agreement_estimates_jaccard():
    rng = random.Random(1)
    base = [_doc(rng) for _ in range(200)]
    pairs = [t for b in base for t in (b, _mutate(rng, b, 0.05))]
    mh = MinHasher()
    sig, (h, off) = mh.signatures(pairs), mh.shingles(pairs)
    est = np.array([(sig[i] == sig[i + 1]).mean() for i in range(0, len(pairs), 2)])
    true = np.array([jaccard(h[off[i]:off[i + 1]], h[off[i + 1]:off[i + 2]]) for i in range(0, len(pairs), 2)])
    assert abs((est - true).mean()) < 0.01 and (est - true).std() < 0.06


def test_lsh_params_put_threshold_above_the_knee():
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128 and collision_probability(0.8, b, r) >= 0.99
    assert collision_probability(0.3, b, r) < 0.05


def _corpus(tmp_path, n=400, seed=2):
    rng = random.Random(seed)
    base = [_doc(rng) for _ in range(n)]
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(base)]
    truth = {}
    for i in range(0, n, 4):  # a quarter of the docs get a near-copy with 1-10% words changed
        rows.append({"id": f"copy{i}", "text": _mutate(rng, base[i], rng.uniform(0.01, 0.10))})
        truth[f"copy{i}"] = f"d{i}"
    rng.shuffle(rows)
    for k in range(3):
        (tmp_path / f"in{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[k::3]) + "{broken\n")
    return sorted(tmp_path.glob("in*.jsonl")), rows, truth


def _kept(out):
    return [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_recall_precision_and_manifest(tmp_path):
    inputs, rows, truth = _corpus(tmp_path)
    m = near_dedup(inputs, tmp_path / "out", NearDedupConfig(threshold=0.8), executor=LocalExecutor(1))
    t = m["totals"]
    assert t["docs_in"] == t["kept"] + t["dropped"] + t["quarantined"] and t["quarantined"] == 3
    kept = {r["id"] for r in _kept(tmp_path / "out")}
    text = {r["id"]: r["text"] for r in rows}
    h = MinHasher()
    sets = {k: set(h.shingles([v])[0].tolist()) for k, v in text.items()}
    j = {c: len(sets[c] & sets[o]) / len(sets[c] | sets[o]) for c, o in truth.items()}
    high = [c for c in truth if j[c] >= 0.85]
    assert len(high) >= 10
    found = sum(not (c in kept and truth[c] in kept) for c in high)
    assert found / len(high) >= 0.95
    removed = set(text) - kept
    # precision: every removed doc has a kept partner with Jaccard >= 0.5
    for rid in removed:
        partners = (truth.get(rid), rid.replace("d", "copy", 1))
        assert any(len(sets[rid] & sets[k]) / len(sets[rid] | sets[k]) >= 0.5 for k in partners if k in kept), rid
    assert m["lsh"]["verified_pairs"] <= m["lsh"]["candidate_pairs"]


def test_cluster_column_mark_only_and_survivor_is_first(tmp_path):
    docs = ["the quick brown fox jumps over the lazy dog near the river bank today"] * 3 + [
        "completely different text about metal and glass and paper in a field of light"]
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"id": f"x{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    near_dedup([f], tmp_path / "o1", NearDedupConfig(cluster_column=True), executor=LocalExecutor(1))
    assert [(r["id"], r["dup_cluster"]) for r in _kept(tmp_path / "o1")] == [("x0", 0), ("x3", -1)]
    near_dedup([f], tmp_path / "o2", NearDedupConfig(mark_only=True), executor=LocalExecutor(1))
    assert [r["dup_cluster"] for r in _kept(tmp_path / "o2")] == [0, 0, 0, -1]


def test_killed_run_restarts_skipping_finished_shards_same_output(tmp_path):
    inputs, _, _ = _corpus(tmp_path, n=120)
    full = tmp_path / "full"
    near_dedup(inputs, full, NearDedupConfig(cluster_column=True), executor=LocalExecutor(2))
    part = tmp_path / "part"
    near_dedup(inputs, part, NearDedupConfig(cluster_column=True), executor=LocalExecutor(1))
    # Simulate a kill during pass 3: the second and third shards and the manifest never finished.
    for i in (1, 2):
        (part / f"part-{i:05d}.parquet").unlink()
        (part / ".hone" / "work" / f"part-{i:05d}.done").unlink()
    (part / ".hone" / "manifest.json.done").unlink()
    mtime0 = (part / "part-00000.parquet").stat().st_mtime_ns
    m = near_dedup(inputs, part, NearDedupConfig(cluster_column=True), executor=LocalExecutor(1))
    assert (part / "part-00000.parquet").stat().st_mtime_ns == mtime0  # finished shard skipped
    for i in range(3):
        a, b = pq.read_table(full / f"part-{i:05d}.parquet"), pq.read_table(part / f"part-{i:05d}.parquet")
        assert a.equals(b)
    assert m["totals"] == json.loads((full / ".hone" / "manifest.json").read_text())["totals"]


def test_changed_config_recomputes(tmp_path):
    inputs, _, _ = _corpus(tmp_path, n=40)
    m1 = near_dedup(inputs, tmp_path / "o", NearDedupConfig(threshold=0.8), executor=LocalExecutor(1))
    m2 = near_dedup(inputs, tmp_path / "o", NearDedupConfig(threshold=0.5), executor=LocalExecutor(1))
    assert m1["config"]["threshold"] == 0.8 and m2["config"]["threshold"] == 0.5
    assert m2["totals"]["dropped"] >= m1["totals"]["dropped"]


def test_word_hashes_long_words_and_position_independence():
    # words of 1..200 bytes (8-byte loads, the vectorized tail up to 64 bytes, xxh3 beyond),
    # each written twice in different places and case: equal words hash equal, others differ
    rng = random.Random(3)
    words = ["".join(rng.choice("abcdefghij") for _ in range(k)) for k in range(1, 201)]
    words += [w[:-1] + "z" for w in words[1:]]  # differ only in the last byte
    text = " ".join(words) + " ... " + " ".join(w.upper() for w in reversed(words))
    h, off = MinHasher(ngram=1).shingles([text])
    assert len(h) == 2 * len(words) and len(set(h.tolist())) == len(words)
    assert h[:len(words)].tolist() == h[len(words):][::-1].tolist()


def test_candidate_pairs_equal_brute_force():
    from hone.corpus.minhash import candidate_pairs

    rng = np.random.default_rng(4)
    keys = rng.integers(0, 60, size=(300, 5)).astype(np.uint64) * np.uint64(1000) + np.arange(5, dtype=np.uint64)
    keys[:40, 0] = 7  # one bucket of 40 (> MAX_ALL_PAIRS): chain + star
    valid = np.ones(300, bool)
    valid[::7] = False
    got = {tuple(p) for p in candidate_pairs(keys, valid).tolist()}
    want = set()
    for i in range(300):
        for j in range(i + 1, 300):
            if valid[i] and valid[j] and (keys[i] == keys[j]).any():
                if (keys[i, 1:] == keys[j, 1:]).any() or not (i < 40 and j < 40):
                    want.add((i, j))
    big = [i for i in range(40) if valid[i]]
    want |= {(a, b) for a, b in zip(big, big[1:])} | {(big[0], b) for b in big[2:]}
    assert got == want


def test_sorted_jaccard_matches_sets():
    from hone.corpus.minhash import per_doc_unique, sorted_jaccard

    rng = random.Random(5)
    texts = [_doc(rng, rng.randrange(3, 60)) for _ in range(30)] + ["", "one"]
    sets, off = MinHasher().shingle_sets(texts)
    for i in range(len(texts) - 1):
        a, b = sets[off[i]:off[i + 1]], sets[off[i + 1]:off[i + 2]]
        assert (np.diff(a.astype(np.int64)) > 0).all()
        ra, rb = set(a.tolist()), set(b.tolist())
        assert sorted_jaccard(a, b) == pytest.approx(len(ra & rb) / len(ra | rb) if ra | rb else 1.0)
    h = np.array([5, 5, 1, 9, 1], dtype=np.uint64) << np.uint64(32)
    s, o = per_doc_unique(h, np.array([0, 3, 5]))
    assert s.tolist() == [1, 5, 1, 9] and o.tolist() == [0, 2, 4]
