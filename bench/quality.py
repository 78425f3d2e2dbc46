"""Search and category quality of one profile in one run: BM25, the base model, the fine-tuned teacher, INT8 served
(dense alone and fused with BM25, the weight chosen on validation terms); the out-of-domain check of each encoder.

    .venv/bin/python bench/quality.py --profile default      # prints a table, then the JSON
    .venv/bin/python bench/quality.py --methods full,lora,full+augment,lora+augment   # training recipes side by side

Not part of the test suite. Held-out Home Depot terms (1,326, project md5 rule) over the whole catalog (54,667 titles);
PriceRunner held-out clusters for categories, against TF-IDF + logistic regression trained on the same split.
Out of domain (pipelines/evaluation/out_of_domain.py, what gate.max_out_of_domain_drop reads): held-out PriceRunner
offer titles -> their canonical titles, nDCG@10 and Recall@10 of the base model, the fine-tuned teacher and the served
INT8 bundle on the same queries; the fine-tuning is on Home Depot only unless the profile mixes PriceRunner in.
--methods trains one teacher per recipe (train.method full | lora, +augment = train.augment.enabled), each in a fresh
process (its peak RSS is the training's own), scores each teacher's held-out and out-of-domain nDCG@10 beside the
base model, then exports it as the served INT8 bundle (dense: its share of the teacher; hybrid: as served), and pairs
each recipe's served hybrid nDCG@10 with the first recipe's on the same terms (bootstrap 95% interval).
With --set rerank.enabled=true the served bundle also gets the cross-encoder reranker (pipelines/training/reranker.py,
trained from the base model's weights): the served hybrid row is then the same run without and with its top
rerank.top_n reordered (nDCG@10, MRR@10, Judged@10, nDCG'@10), and `reranker` holds its training, parity and latency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _retrieval(qrels, run) -> dict:
    from pipelines.evaluation.evaluate import ir_metrics, judgment_coverage, rerank_ndcg

    return {**ir_metrics(qrels, run), "rerank_ndcg_at_10": rerank_ndcg(qrels, run), **judgment_coverage(qrels, run)}


def _train_child(snapshot_dir: str, out_dir: str, train_json: str) -> dict:
    """One fine-tuning in a fresh process: its result, wall time and the process's peak RSS."""
    import resource

    from pipelines.config import TrainConfig
    from pipelines.training.finetune import finetune_encoder

    t0 = time.perf_counter()
    trained = finetune_encoder(snapshot_dir, out_dir, TrainConfig.model_validate_json(train_json))
    trained["finetune_seconds"] = round(time.perf_counter() - t0, 1)
    trained["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    return trained


def method_config(train, method: str):
    """'full' | 'lora', optionally '+augment': the profile's TrainConfig with that recipe."""
    name, _, extra = method.partition("+")
    if name not in {"full", "lora"} or extra not in {"", "augment"}:
        raise SystemExit(f"unknown method {method!r}: expected full|lora[+augment]")
    augment = train.augment.model_copy(update={"enabled": extra == "augment"})
    return train.model_copy(update={"method": name, "augment": augment})


def compare_methods(methods: list[str], cfg, snap, qrels, terms, work: Path, result: dict, out_of_domain) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pipelines.evaluation.evaluate import embedding_run
    from pipelines.training.finetune import load_finetuned, unit_vectors

    catalog, k = snap.table("catalog"), cfg.evaluate.retrieve_k
    result["methods"] = {}
    for method in methods:
        train = method_config(cfg.train, method)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            trained = pool.submit(
                _train_child, str(snap.path), str(work / f"finetune-{method}"), train.model_dump_json()
            ).result()
        t0 = time.perf_counter()
        model, _, _ = load_finetuned(trained["model_dir"], cfg.train.max_seq_length)
        run, _, _ = embedding_run(unit_vectors(model), catalog, terms, k)
        name = f"teacher_{method}"
        result["retrieval"][name] = _retrieval(qrels, run)
        result["seconds"][f"{name}_eval"] = round(time.perf_counter() - t0, 1)
        out_of_domain(name, unit_vectors(model))
        del model
        served = served_rows(
            trained["model_dir"], cfg, snap, work / f"bundle-{method}", f"served_{method}", result, out_of_domain
        )
        keep = ("finetune_seconds", "train_seconds", "peak_rss_mb", "trainable_parameters", "total_parameters")
        result["methods"][method] = {key: trained.get(key) for key in keep} | {
            "ndcg_at_10": result["retrieval"][name]["ndcg_at_10"],
            "ood_ndcg_at_10": result["out_of_domain"].get(name, {}).get("ndcg_at_10"),
            "val_ndcg_at_10": trained.get("val_ndcg_at_10"),
            # the served INT8 bundle of this teacher: dense alone (its share of the teacher) and as served (hybrid)
            "served_dense_ndcg_at_10": served.get("dense_ndcg_at_10", served["ndcg_at_10"]),
            "served_share_of_teacher": served.get("dense_ndcg_at_10", served["ndcg_at_10"])
            / result["retrieval"][name]["ndcg_at_10"],
            "served_ndcg_at_10": served.get("unreranked_ndcg_at_10", served["ndcg_at_10"]),
            "served_ood_ndcg_at_10": result["out_of_domain"].get(f"served_{method}", {}).get("ndcg_at_10"),
            "training": {k2: v for k2, v in trained.items() if k2 not in {"loss_history", "model_dir"}},
        }
        print(f"{method}: {json.dumps({k2: v for k2, v in result['methods'][method].items() if k2 != 'training'})}")
    paired_vs_first(methods, work, result)


def paired_vs_first(methods: list[str], work: Path, result: dict) -> None:
    """Each recipe's served hybrid nDCG@10 against the first recipe's, paired on the same held-out terms: the mean
    difference and its bootstrap 95% interval (what the promotion gate reads), so a gap is read against its noise."""
    from pipelines.evaluation.evaluate import read_per_query
    from pipelines.evaluation.paired import paired_bootstrap

    first = read_per_query(work / f"bundle-{methods[0]}")
    for method in methods[1:]:
        paired = paired_bootstrap(read_per_query(work / f"bundle-{method}"), first)
        result["methods"][method][f"served_vs_{methods[0]}"] = paired.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set train.max_steps=50 (YAML value)",
    )
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated training recipes to compare instead of the one-teacher run: full, lora, "
        "full+augment, lora+augment",
    )
    parser.add_argument(
        "--served-only",
        action="store_true",
        help="skip the PyTorch fp32 rows (base model, fine-tuned teacher, its category head, TF-IDF): BM25 and the "
        "served bundle only (with rerank.enabled: without and with the reranker)",
    )
    args = parser.parse_args()

    import yaml

    from pipelines.config import load_config
    from pipelines.data.dataset import Snapshot, snapshot_data
    from pipelines.evaluation.evaluate import bm25_run, heldout_qrels
    from pipelines.evaluation.out_of_domain import out_of_domain_task, score_out_of_domain
    from pipelines.training.finetune import finetune_encoder

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = load_config(args.profile, overrides)
    work = Path(args.out or tempfile.mkdtemp(prefix="shopguide-quality-"))
    snap = snapshot_data(cfg.data, work / "data", datetime(2026, 11, 1, tzinfo=UTC))
    snap = Snapshot.open(snap.path)
    catalog, heldout = snap.table("catalog"), snap.table("judgments_heldout")
    qrels = heldout_qrels(heldout)
    terms = sorted(qrels)
    k = cfg.evaluate.retrieve_k
    result: dict = {
        "profile": cfg.profile,
        "overrides": overrides,
        "heldout_terms": len(terms),
        "catalog": len(catalog),
        "retrieval": {},
        "category": {},
        "out_of_domain": {},
        "seconds": {},
    }
    ood_task = None
    if cfg.evaluate.out_of_domain_queries:
        ood_task = out_of_domain_task(snap, cfg.evaluate.out_of_domain_queries, cfg.evaluate.out_of_domain_distractors)
        result["out_of_domain_queries"], result["out_of_domain_titles"] = len(ood_task.queries), len(ood_task.corpus)

    def out_of_domain(name: str, *encoders) -> None:
        if ood_task is not None:
            t1 = time.perf_counter()
            result["out_of_domain"][name] = score_out_of_domain(ood_task, *encoders)
            result["seconds"][f"{name}_ood"] = round(time.perf_counter() - t1, 1)

    t0 = time.perf_counter()
    result["retrieval"]["bm25"] = _retrieval(qrels, bm25_run(catalog, terms, k, stem=False))
    result["retrieval"]["bm25_stemmed"] = _retrieval(qrels, bm25_run(catalog, terms, k, stem=True))
    result["seconds"]["bm25"] = round(time.perf_counter() - t0, 1)

    if not args.served_only:
        base_row(cfg, catalog, qrels, terms, k, result, out_of_domain)

    if args.methods:
        if not args.served_only:  # the category baseline the README's table quotes beside the served bundles
            from pipelines.evaluation.evaluate import category_baseline

            offers = snap.table("offers_train"), snap.table("offers_test")
            result["category"]["tfidf_logreg"] = category_baseline(*offers)
        compare_methods(args.methods.split(","), cfg, snap, qrels, terms, work, result, out_of_domain)
        _print_methods(result)
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return

    t0 = time.perf_counter()
    trained = finetune_encoder(snap.path, work / "finetune", cfg.train)
    result["seconds"]["finetune"] = round(time.perf_counter() - t0, 1)
    result["training"] = {k2: v for k2, v in trained.items() if k2 not in {"loss_history", "model_dir"}}

    if not args.served_only:
        teacher_rows(trained["model_dir"], cfg, snap, qrels, terms, k, result, out_of_domain)

    served_rows(trained["model_dir"], cfg, snap, work / "bundle", "served_int8", result, out_of_domain)

    print(f"\nprofile {cfg.profile} {overrides or ''}: {len(terms)} held-out terms x {len(catalog)} products")
    print(
        f"{'model':<18} {'nDCG@10':>8} {'MRR@10':>8} {'R@100':>8} {'rerank nDCG@10':>15} {'Judged@10':>9} "
        f"{'cond. nDCG@10':>13}"
    )
    for name, m in result["retrieval"].items():
        print(
            f"{name:<18} {m['ndcg_at_10']:>8.4f} {m.get('mrr_at_10', float('nan')):>8.4f} "
            f"{m.get('recall_at_100', float('nan')):>8.4f} {m.get('rerank_ndcg_at_10', float('nan')):>15.4f} "
            f"{m.get('judged_at_10', float('nan')):>9.4f} {m.get('condensed_ndcg_at_10', float('nan')):>13.4f}"
        )
    print(f"{'category':<22} {'accuracy':>8} {'macro-F1':>8}")
    for name, m in result["category"].items():
        print(f"{name:<22} {m['category_accuracy']:>8.4f} {m.get('category_macro_f1', float('nan')):>8.4f}")
    if result["out_of_domain"]:
        print(
            f"out of domain: {result['out_of_domain_queries']} held-out PriceRunner offers x "
            f"{result['out_of_domain_titles']} canonical titles"
        )
        print(f"{'model':<18} {'nDCG@10':>8} {'R@10':>8} {'vs base':>8}")
        base_ndcg = result["out_of_domain"]["base_fp32"]["ndcg_at_10"]
        for name, m in result["out_of_domain"].items():
            print(f"{name:<18} {m['ndcg_at_10']:>8.4f} {m['recall_at_10']:>8.4f} {m['ndcg_at_10'] - base_ndcg:>+8.4f}")
    print(f"seconds: {result['seconds']}")
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def served_rows(model_dir, cfg, snap, bundle: Path, prefix: str, result: dict, out_of_domain) -> dict:
    """The teacher exported as the served INT8 bundle (ONNX, graph optimization, INT8, product index, BM25 fusion;
    with rerank.enabled the cross-encoder too), scored as served: the dense and hybrid rows under `prefix`, with and
    without the reranker, and out of domain. Returns evaluate_bundle's report."""
    from pipelines.compression.export import build_product_index, export_bundle, export_reranker, reranker_parity_pairs
    from pipelines.evaluation.evaluate import evaluate_bundle
    from pipelines.evaluation.fusion import build_lexical_index
    from pipelines.evaluation.out_of_domain import bundle_encoders
    from pipelines.training.reranker import train_reranker

    t0 = time.perf_counter()
    exported = export_bundle(model_dir, snap.path, bundle, cfg)
    build_product_index(bundle, snap.path)
    result.setdefault("hybrid", {})[prefix] = build_lexical_index(bundle, snap.path, cfg.search, cfg.evaluate)
    if cfg.rerank.enabled:  # the reranker in the same bundle: evaluate_bundle reports without and with it
        t1 = time.perf_counter()
        if "reranker_training" not in result:  # trained once from the base model's weights, whatever the encoder
            result["reranker_training"] = train_reranker(
                snap.path,
                bundle.parent / "reranker",
                cfg.rerank,
                cfg.train.base_model,
                cfg.train.mined_negative_ranks,
                cfg.train.seed,
            )
            result["seconds"]["rerank_train"] = round(time.perf_counter() - t1, 1)
        pairs = reranker_parity_pairs(snap, cfg.rerank.parity_pairs)
        reranker_dir = result["reranker_training"]["reranker_dir"]
        result.setdefault("reranker", {})[prefix] = export_reranker(reranker_dir, bundle, pairs, cfg)
    served = evaluate_bundle(
        bundle,
        snap.path,
        cfg.evaluate.model_copy(update={"max_category_offers": None}),
        exported["parity"]["cosine_min"],
    )
    if "dense_ndcg_at_10" in served:
        result["retrieval"][f"{prefix}_dense"] = {"ndcg_at_10": served["dense_ndcg_at_10"]}
    name = f"{prefix}_hybrid" if result["hybrid"][prefix]["lexical"] else prefix
    figures = ("ndcg_at_10", "mrr_at_10", "recall_at_100", "judged_at_10", "condensed_ndcg_at_10")
    # with a reranker: the same hybrid run without it and with its top N reordered (Recall@100: the same 100)
    result["retrieval"][name] = {m: served.get(f"unreranked_{m}", served[m]) for m in figures}
    if "rerank_top_n" in served:
        result["retrieval"][f"{name}_reranked_top{served['rerank_top_n']}"] = {
            m: served.get(f"reranked_{m}", served[m]) for m in figures
        }
        result["reranker"][prefix] |= {k: v for k, v in served.items() if k.startswith("rerank_")}
    result["category"][prefix] = {m: served[m] for m in ("category_accuracy",) if m in served}
    result["seconds"][f"{prefix}_export_index_eval"] = round(time.perf_counter() - t0, 1)
    out_of_domain(prefix, *bundle_encoders(bundle, cfg.evaluate.batch_size))
    return served


def base_row(cfg, catalog, qrels, terms, k, result: dict, out_of_domain) -> None:
    """The base model in PyTorch fp32 over the whole catalog (and out of domain)."""
    from pipelines.evaluation.evaluate import embedding_run
    from pipelines.training.finetune import load_encoder, unit_vectors

    t0 = time.perf_counter()
    base = load_encoder(cfg.train.base_model, cfg.train.max_seq_length)
    run, _, _ = embedding_run(unit_vectors(base), catalog, terms, k)
    result["retrieval"]["base_fp32"] = _retrieval(qrels, run)
    result["seconds"]["base_eval"] = round(time.perf_counter() - t0, 1)
    out_of_domain("base_fp32", unit_vectors(base))
    del base


def teacher_rows(model_dir, cfg, snap, qrels, terms, k, result: dict, out_of_domain) -> None:
    """The fine-tuned teacher in PyTorch fp32: retrieval, its category head, out of domain; the TF-IDF baseline."""
    import numpy as np

    from pipelines.evaluation.evaluate import category_baseline, embedding_run
    from pipelines.training.finetune import load_finetuned, unit_vectors

    catalog = snap.table("catalog")
    t0 = time.perf_counter()
    model, head, labels = load_finetuned(model_dir, cfg.train.max_seq_length)
    run, _, _ = embedding_run(unit_vectors(model), catalog, terms, k)
    result["retrieval"]["finetuned_fp32"] = _retrieval(qrels, run)
    offers_test = snap.table("offers_test")
    import torch

    with torch.no_grad():
        emb = torch.from_numpy(unit_vectors(model)(offers_test["offer_title"].astype(str).tolist()))
        predicted = np.asarray(labels)[head(emb).argmax(1).numpy()]
    from sklearn.metrics import accuracy_score, f1_score

    truth = offers_test["category_label"].astype(str).to_numpy()
    result["category"]["finetuned_head_fp32"] = {
        "category_accuracy": float(accuracy_score(truth, predicted)),
        "category_macro_f1": float(f1_score(truth, predicted, average="macro")),
    }
    result["seconds"]["finetuned_eval"] = round(time.perf_counter() - t0, 1)
    out_of_domain("finetuned_fp32", unit_vectors(model))
    result["category"]["tfidf_logreg"] = category_baseline(snap.table("offers_train"), offers_test)


def _print_methods(result: dict) -> None:
    base, ood_base = result["retrieval"]["base_fp32"]["ndcg_at_10"], result["out_of_domain"].get("base_fp32", {})
    print(f"\n{result['heldout_terms']} held-out terms x {result['catalog']} products; base nDCG@10 {base:.4f}")
    print(
        f"{'method':<14} {'nDCG@10':>8} {'val':>7} {'OOD':>7} {'OOD-base':>8} {'train s':>8} {'finetune s':>10} "
        f"{'trainable':>11} {'of total':>8} {'peak RSS MB':>11} {'served':>7} {'share':>6} {'hybrid':>7}"
    )
    for name, m in result["methods"].items():
        ood = m["ood_ndcg_at_10"]
        print(
            f"{name:<14} {m['ndcg_at_10']:>8.4f} {m['val_ndcg_at_10'] or float('nan'):>7.4f} "
            f"{ood if ood is not None else float('nan'):>7.4f} "
            f"{(ood - ood_base['ndcg_at_10']) if ood is not None and ood_base else float('nan'):>+8.4f} "
            f"{m['train_seconds']:>8.1f} {m['finetune_seconds']:>10.1f} {m['trainable_parameters']:>11,} "
            f"{m['trainable_parameters'] / m['total_parameters']:>8.2%} {m['peak_rss_mb']:>11.0f} "
            f"{m['served_dense_ndcg_at_10']:>7.4f} {m['served_share_of_teacher']:>6.1%} {m['served_ndcg_at_10']:>7.4f}"
        )
    print("category accuracy: " + ", ".join(f"{n} {m['category_accuracy']:.4f}" for n, m in result["category"].items()))
    for name, m in result["methods"].items():
        for key, p in m.items():
            if key.startswith("served_vs_"):
                print(f"{name} {key}: {p['mean_difference']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] (hybrid nDCG@10)")


if __name__ == "__main__":
    main()
