"""The recipe's `data:` section (labtune.recipe): sources, notes, data.augment, data.replay.

Apart from labtune/recipe.py so that each stays a file a newcomer reads at once.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    # allow_inf_nan: `.inf`, `1e999` and `.nan` are refused at load, naming the key, not by the worker
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataSource(_Strict):
    """One input data set. `weight` scales how many of its records go into the mix: 1.0 takes
    every record once, 0.5 a seeded half, 2.0 every record twice."""

    type: Literal["lab_notes", "sharegpt", "alpaca", "messages"]
    path: str
    weight: float = Field(default=1.0, ge=0.0)
    eval_fraction: float | None = Field(default=None, ge=0.0, lt=1.0)


class AugmentConfig(_Strict):
    """Facts in many forms (labtune/data/augment.py): each lab-note fact asked in many phrasings and
    date forms, reverse questions, summaries, and dates with no meeting; held-out phrasings and date
    forms build the evaluation's `paraphrase`, `reverse` and `absent` prompts."""

    # off by default: the demo turns it on (docs/evaluation.md, "Learning facts fast")
    enabled: bool = False
    questions_per_fact: int = Field(default=12, ge=1, le=70)  # training questions per meeting x field
    reverse: bool = True  # "When did X present?" -> the dates
    summaries: bool = True  # "What happened at the lab meeting on D?" -> presenter, recorder, topic
    absent_ratio: float = Field(default=0.5, ge=0.0, le=5.0)  # dates with no meeting, per meeting date
    absent_questions: int = Field(default=3, ge=1, le=20)  # training questions per such date, the fields in turn
    # training's no-meeting dates lie this near a meeting: the nearer, the more digits shared, the harder the comparison
    absent_within_days: int = Field(default=14, ge=1, le=60)
    eval_absent_dates: int = Field(default=6, ge=0, le=200)  # held-out no-meeting dates asked in evaluation
    # date answers recite the month's meetings first ("On 4/21/2023 (April meetings: 14, 28) ..."): compare, not guess
    recite_month: bool = False
    # with recite_month: the verdict beside the list ("...: 14, 28; 21 is not among them)") (docs/evaluation.md)
    recite_check: bool = True
    # training questions per conversation (unrelated facts as turns of one chat): the template's tokens paid once
    facts_per_conversation: int = Field(default=1, ge=1, le=16)
    # with attendees in qa_fields: training questions per member x meeting ("Was X at ...?")
    attendance_questions: int = Field(default=1, ge=1, le=12)
    # "Who presented on D and what was it about?" answered with both: per meeting (held-out tag two_part)
    two_part_questions: int = Field(default=0, ge=0, le=8)
    # one trained wording per fact asked back (tag recall); off: evaluation asks only unseen wordings (a third fewer)
    recall_questions: bool = True
    # training questions per statement of a note (results, plans, what was said: labtune/data/statements.py); 0: off
    statement_questions: int = Field(default=0, ge=0, le=40)
    # held-out statement questions per meeting in the evaluation (0: one per statement); a sample keeps it short
    eval_statements: int = Field(default=0, ge=0, le=100)
    # RAFT (labtune/data/raft.py): this share of the questions carry notes in the prompt as retrieval puts them,
    # raft_golden of those the asked meeting's note among raft_distractors others, the rest distractors only
    raft_share: float = Field(default=0.0, ge=0.0, le=1.0)
    raft_golden: float = Field(default=0.8, ge=0.0, le=1.0)
    raft_distractors: int = Field(default=0, ge=0, le=8)  # other notes beside the right one: evaluation.retrieval_k - 1
    # golden questions about one meeting asked in one conversation under its note, up to this many: the note's
    # tokens, most of such an example, are paid once for them (a user asks follow-ups in `labtune chat --notes`)
    raft_questions_per_note: int = Field(default=1, ge=1, le=8)
    # same: every RAFT question keeps its closed-book answer; cite: golden ones recite the note's date instead of
    # the month's meetings; from_note: golden ones recite nothing (labtune/data/raft.py)
    raft_answers: Literal["same", "cite", "from_note"] = "same"
    # early stopping's questions (train.eval_strategy): trained facts and fresh no-meeting dates in other held-out wordings
    dev_questions: int = Field(default=0, ge=0, le=2000)


class ReplayConfig(_Strict):
    """Self-replay (labtune/stages/replay.py): the target model's own answers to general prompts, made
    once per model, join the training set, so the fine-tune stays the chat model it was."""

    enabled: bool = False
    prompts: str = "builtin"  # labtune's 169 (data/general/replay_prompts.txt) or a prompt file; never the evaluation's
    count: int = Field(default=96, ge=1)  # prompts answered: a seeded shuffle's first
    max_new_tokens: int = Field(default=96, ge=8)  # an answer cut here ends at its last whole sentence
    # 0: greedy answers; above 0: drawn from the model's distribution (seeded by data.seed; docs/evaluation.md)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    batch_size: int = Field(default=64, ge=1)


class SynthesizeConfig(_Strict):
    """Model-written study material (labtune/stages/synthesize.py): a generator model writes question-answer
    pairs and retellings of each note; only pairs faithful to their note (names, numbers, dates) train."""

    enabled: bool = False
    generator: str | None = None  # a model folder or a stage output's URI; unset: the target model (delta's output)
    questions_per_note: int = Field(default=8, ge=1, le=64)
    rewrites: int = Field(default=1, ge=0, le=8)  # retellings per note, each "What happened at the lab meeting on D?"
    max_new_tokens: int = Field(default=384, ge=16)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)  # 0: greedy (each rewrite the same)
    batch_size: int = Field(default=16, ge=1)


class DataConfig(_Strict):
    """Conversion (sources, notes, cleaning, mix and split) and tokenization settings."""

    sources: list[DataSource] = Field(min_length=1)
    eval_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    note_conversations: bool = True
    qa_pairs: bool = True
    # with data.augment: action_items asks owners and due dates, attendees "Was X at ...?", decisions "What did ...?"
    qa_fields: list[Literal["presenter", "recorder", "topic", "attendees", "action_items", "decisions"]] = Field(
        default_factory=lambda: ["presenter", "recorder", "topic", "attendees", "action_items", "decisions"])
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    undated_notes: Literal["skip", "fail"] = "skip"
    # how 03/04/2023 is read (year first: always Y-M-D); a note that reads otherwise the other way is in the data report
    date_order: Literal["MDY", "DMY"] = "MDY"
    # a lab's own words for the note fields, added to labtune.data.notes.FIELD_WORDS ({presenter: [Vortrag]})
    field_names: dict[Literal["presenter", "recorder", "topic", "attendees", "action_items", "decisions", "agenda",
                              "date"], list[str]] = Field(default_factory=dict)

    @field_validator("field_names")
    @classmethod
    def _words(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, words in value.items():
            bad = [w for w in words if not isinstance(w, str) or not re.fullmatch(r"[^\W\d_][\w .'-]*", w.strip())]
            if bad:
                raise ValueError(f"{name}: {bad[0]!r} is not a word or phrase (letters, spaces, hyphens)")
        return value
    invalid_conversations: Literal["drop", "fail"] = "drop"
    chat_template: Literal["auto", "vicuna_v1.1", "tokenizer"] = "auto"
    # a system turn for every conversation without one, in training and evaluation alike; None: the template's
    # default ("" drops SmolLM2's 16-token default: short facts train faster)
    system_prompt: str | None = None
    # the tokenize stage's limit (FastChat's --model_max_length; `train.model_max_length` is read too)
    model_max_length: int = Field(default=2048, ge=8)
    num_proc: int | None = Field(default=None, ge=1)
    seed: int = 42

    @model_validator(mode="after")
    def _something_from_notes(self) -> DataConfig:
        if not self.note_conversations and not self.qa_pairs:
            raise ValueError("note_conversations and qa_pairs are both false: lab notes would give no conversations")
        return self
