"""`bert-jax predict`: one pipeline, by task name, on a model directory, and its results as
plain text (JSON is the results themselves)."""

from __future__ import annotations

from pathlib import Path

from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.inference.embeddings import embed
from bert_jax.inference.fill_mask import fill_mask
from bert_jax.inference.ner import ner
from bert_jax.inference.question_answering import answer
from bert_jax.inference.text_classification import classify
from bert_jax.pretrained import from_pretrained

TASKS = ("fill-mask", "ner", "text-classification", "question-answering", "embeddings")


def predict(task: str, model_dir: str | Path, inputs: list[str], *, top_k: int | None = None,
            aggregation: str = "none", pooling: str = "mean", normalize: bool = True,
            context: str | None = None, batch_size: int = 32, truncation: bool = False) -> list:
    """One result per input (for question-answering the inputs are questions about `context`;
    for embeddings each result is the text's vector as a list)."""
    if task not in TASKS:
        raise BertJaxError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
    if not inputs:
        raise BertJaxError("no inputs (give texts as arguments, or a file or stdin with one "
                           "per line)")
    if (task == "question-answering") != (context is not None):
        raise BertJaxError("--context is needed by question-answering, and only by it")
    # Embeddings need the encoder only: loading it alone skips computing any task head.
    model = from_pretrained(model_dir, head="Model" if task == "embeddings" else None)
    tokenizer = load_tokenizer(model.source_dir)  # a Hub id resolves to its download
    if task == "fill-mask":
        return fill_mask(model, tokenizer, inputs, top_k=5 if top_k is None else top_k,
                         batch_size=batch_size)
    if task == "ner":
        return ner(model, tokenizer, inputs, aggregation, batch_size=batch_size)
    if task == "text-classification":
        return classify(model, tokenizer, inputs, top_k=1 if top_k is None else top_k,
                        batch_size=batch_size, truncation=truncation)
    if task == "question-answering":
        return answer(model, tokenizer, inputs, context, top_k=1 if top_k is None else top_k,
                      batch_size=batch_size)
    return embed(model, tokenizer, inputs, pooling, normalize, batch_size=batch_size).tolist()


def format_text(task: str, inputs: list[str], results: list) -> str:
    """Readable lines per input, under the input itself when there are several; embeddings
    as a matrix, one row of numbers per input."""
    if task == "embeddings":
        return "\n".join(" ".join(f"{x:.6g}" for x in row) for row in results)
    return "\n\n".join("\n".join(([text] if len(inputs) > 1 else []) + _lines(task, result))
                       for text, result in zip(inputs, results))


def _lines(task: str, result) -> list[str]:
    if task == "fill-mask":
        per_mask = [result] if isinstance(result[0], dict) else result
        lines = []
        for i, predictions in enumerate(per_mask):
            lines += [f"mask {i + 1}:"] if len(per_mask) > 1 else []
            lines += [f"{p['score']:.4f}  {p['token_str']:<15}  {p['sequence']}"
                      for p in predictions]
        return lines
    if task == "ner":
        return [f"{e.get('entity_group', e.get('entity')):<10} {e['score']:.4f}  "
                f"{e['start']}-{e['end']}  {e['word']}" for e in result] or ["(no entities)"]
    if task == "text-classification":
        return [f"{r['score']:.4f}  {r['label']}" for r in result]
    return [f"{a['score']:.4f}  {a['start']}-{a['end']}  {a['answer']}"  # question-answering
            for a in ([result] if isinstance(result, dict) else result)]
