"""Where a corpus's token ids come from, as every corpus writer records it.

A corpus is only as usable as its ids are traceable: a student trains on them without
retokenizing only if they are in its tokenizer, and a resumed run may add to a corpus only if
the model is the same one. So every writer (``generate``, ``synthesize``, ``replay``) records
the same fields through :func:`provenance`: the tokenizer (name, size, fingerprint), the BOS id
and where it came from, the EOS id, and the model with its resolved revision. A model that
samples (:func:`source_provenance`) resolves its BOS and EOS ids here first, and
:func:`resolved_spec` turns the record into the spec keys a sharded corpus compares on resume.

It loads nothing itself but reads loaded models and tokenizers, so it sits above
:mod:`selftrain.models` (torch, transformers); readers of a corpus never import it.
"""

from __future__ import annotations

from typing import Any

from selftrain.models import (
    check_token_id,
    model_revision,
    resolve_bos_id,
    tokenizer_fingerprint,
    weights_digest,
)


def provenance(tokenizer, model: str, bos_token_id: int, bos_source: str,
               eos_token_id: int | None, source_config=None) -> dict[str, Any]:
    """The manifest fields that say where a corpus's ids come from.

    A corpus sampled from a model records that model as ``source``, with its resolved revision
    (hub commit, GGUF sha256 or tiny seed) and family; a corpus of real text tokenized for a
    student records the student's spec as ``student``. Both record the tokenizer (name, size,
    fingerprint), the BOS id with where it came from, and the EOS id.

    Args:
        tokenizer: the tokenizer the ``input_ids`` are in.
        model: the spec of the model that tokenizer belongs to.
        bos_token_id: the id every row starts with.
        bos_source: where ``bos_token_id`` came from (see ``models.resolve_bos_id``).
        eos_token_id: the id a finished row ends on (None when there is none).
        source_config: the loaded model's config when the model sampled the corpus; None when
            the text is real and ``model`` is the student it was tokenized for.

    Returns:
        ``source`` or ``student``, then ``tokenizer``, ``bos_token_id``, ``bos_source`` and
        ``eos_token_id``, in the order manifests list them.
    """
    if source_config is not None:
        record: dict[str, Any] = {"source": {
            "model": model, "revision": model_revision(model, source_config),
            "family": source_config.model_type}}
    else:
        record = {"student": model}
    record["tokenizer"] = {"name": str(tokenizer.name_or_path), "vocab_size": len(tokenizer),
                           "fingerprint": tokenizer_fingerprint(tokenizer)}
    record.update(bos_token_id=bos_token_id, bos_source=bos_source, eos_token_id=eos_token_id)
    return record


def source_provenance(model: str, tokenizer, source, bos_token_id: int | None,
                      flag: str = "--bos_token_id") -> dict[str, Any]:
    """Resolve the source's BOS and EOS ids, check the BOS id, and record where they came from.

    Args:
        model: the source's spec.
        tokenizer: its tokenizer.
        source: the loaded source model.
        bos_token_id: the BOS override (``--bos_token_id``), or None.
        flag: where the override came from, named when it is outside the vocabulary.

    Returns:
        The manifest's provenance fields (:func:`provenance`).
    """
    bos_id, bos_source = resolve_bos_id(tokenizer, source.config, bos_token_id)
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (
        source.config.eos_token_id)
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    check_token_id(bos_id, source.get_input_embeddings().weight.shape[0], flag)
    return provenance(tokenizer, model, bos_id, bos_source, eos_id, source_config=source.config)


def resolved_spec(model: str, record: dict[str, Any]) -> dict[str, Any]:
    """The spec keys known only once the model is loaded, from its provenance record.

    A local model dir (an ``hf/epoch=N`` export may be trained again in place) adds the hash
    of its weight files, which its config-only revision does not cover.

    Args:
        model: the model's spec.
        record: its provenance (:func:`source_provenance`).
    """
    spec = {"revision": record["source"]["revision"],
            "tokenizer_fingerprint": record["tokenizer"]["fingerprint"],
            "resolved_bos_token_id": record["bos_token_id"],
            "eos_token_id": record["eos_token_id"]}
    weights = weights_digest(model)
    if weights is not None:
        spec["weights_sha256"] = weights
    return spec
