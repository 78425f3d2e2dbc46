"""The baseline bench/serving.py compares against: the fp32 PyTorch teacher behind a plain transformers + FastAPI app.

    BENCH_TEACHER=<model folder> BENCH_BUNDLE=<bundle> uvicorn bench.teacher_app:app --port 8001

What a team writes first: AutoTokenizer + AutoModel per request, mean pooling, L2 norm, one matmul against the
catalog. The catalog matrix is the bundle's index (same 54,667 x 384 as the service), so both do the same search work
and only the model runtime and the serving path differ. Not part of the product or the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModel, AutoTokenizer

TEACHER = os.environ["BENCH_TEACHER"]
BUNDLE = Path(os.environ["BENCH_BUNDLE"])

# One intra-op thread: with the default (one per core) on a shared 2-core machine, OpenMP barriers wait for
# descheduled threads and single-client latency was ~0.5 s; one thread is the better-tuned baseline here.
torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
tokenizer = AutoTokenizer.from_pretrained(TEACHER)
model = AutoModel.from_pretrained(TEACHER).eval()
embeddings = torch.from_numpy(np.load(BUNDLE / "index" / "embeddings.npy").astype(np.float32))
products = pd.read_parquet(BUNDLE / "index" / "products.parquet")
ids, titles = products["product_id"].to_numpy(), products["title"].to_numpy(object)

app = FastAPI(title="teacher baseline")


class Query(BaseModel):
    query: str
    k: int = 10


@app.post("/search")
def search(body: Query) -> dict:
    with torch.inference_mode():
        batch = tokenizer([body.query], padding=True, truncation=True, max_length=32, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        vec = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)[0]
        scores, rows = torch.topk(embeddings @ vec, body.k)
    return {
        "results": [
            {"product_id": int(ids[r]), "title": str(titles[r]), "score": float(s)}
            for r, s in zip(rows.tolist(), scores.tolist(), strict=True)
        ]
    }


@app.get("/ping")
def ping() -> dict:
    return {"status": "ok"}
