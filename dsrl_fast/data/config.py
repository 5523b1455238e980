"""The data section of a run's config: training and evaluation problems."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dsrl_fast.data.problems import ANSWER_MODES, EMPTY_ANSWERS
from dsrl_fast.data.templates import TEMPLATES
from dsrl_fast.typed_config import Section, check_choice

TEMPLATE_ALIASES = {"qwen3": "qwen3_non_thinking"}
DATA_SUFFIXES = (".jsonl", ".parquet")
PROMPT_OVERFLOW = ("truncate_left", "drop")
TOY_TASKS = ("addition", "corrections")


def check_data_path(key: str, value: str | None) -> None:
    if value is None:
        return
    if value.startswith("hf:"):
        if not value[3:].split(":", 1)[0].strip():
            raise ValueError(f"{key} must name a dataset after 'hf:' (hf:<dataset>[:<split>]), got {value!r}")
    elif not value.endswith(DATA_SUFFIXES):
        raise ValueError(f"{key} must be a path ending in {' or '.join(DATA_SUFFIXES)} or 'hf:<dataset>[:<split>]', "
                         f"got {value!r}")



@dataclass
class DataConfig(Section):
    """Training and evaluation problems.

    Attributes:
        train_path: null generates toy problems (see toy_task); otherwise a ``.jsonl`` / ``.parquet`` file or
            ``hf:<dataset>[:<split>]``. Required when model.name_or_path is set.
        problem_key: field holding the problem text.
        answer_key: field holding the reference answer (or the solution, with answer_mode "boxed").
        answer_mode: how answer_key's value becomes the reference: "field" (as is), "boxed" (the last
            ``\\boxed{}`` of a solution text, like MATH's ``solution``) or "list" (a list, or a list rendered as a
            string such as "['2']", like OlympiadBench's ``final_answer``).
        eval_problem_key: problem field of eval_path's rows; null = problem_key.
        eval_answer_key: answer field of eval_path's rows; null = answer_key.
        eval_answer_mode: answer_mode of eval_path's rows; null = answer_mode.
        eval_path: held-out problems in the same formats; null holds out toy problems (toy data) or skips
            evaluation.
        eval_size: number of evaluation problems (the first eval_size of eval_path).
        template: prompt template (dsrl_fast.data.templates): "qwen3_non_thinking" (the paper's Qwen3 prompt with an
            empty think block; "qwen3" is accepted for it), "chat" (the tokenizer's chat template), "plain" (the
            problem text), or any string containing "{problem}". Toy data always uses "plain".
        max_prompt_len: longest prompt in tokens; longer ones are handled by prompt_overflow.
        prompt_overflow: what happens to a prompt longer than max_prompt_len: "truncate_left" (keep its last
            max_prompt_len tokens, as the authors' data loader does) or "drop" (leave the problem out). The run
            prints how many prompts were affected.
        empty_answers: rows of train_path or eval_path whose answer is empty or whitespace: "error" (stop, naming
            the file and line) or "skip" (leave them out; a warning says how many).
        toy_task: the embedded task when train_path is null: "addition" ("Compute a+b.", one-line answers;
            dsrl_fast.data.toy) or "corrections" ("Compute a+b+c.", two-step traces of which some correct a wrong
            step with "Wait, ..." or "Alternatively, ...": reflection and transition steps to measure;
            dsrl_fast.data.toy_corrections).
        toy_train_size: number of generated toy training problems; with toy evaluation (eval_path null) the
            toy_train_size + eval_size problems are distinct operand pairs (triples for "corrections"), so both
            must fit in (toy_high - toy_low + 1)² (8,100 for 10..99; the cube for "corrections").
        toy_low: smallest toy operand.
        toy_high: largest toy operand (inclusive).
    """

    SECTION: ClassVar[str] = "data"

    train_path: str | None = None
    problem_key: str = "problem"
    answer_key: str = "answer"
    answer_mode: str = "field"
    eval_path: str | None = None
    eval_size: int = 200
    eval_problem_key: str | None = None
    eval_answer_key: str | None = None
    eval_answer_mode: str | None = None
    template: str = "qwen3_non_thinking"
    max_prompt_len: int = 1024
    prompt_overflow: str = "truncate_left"
    empty_answers: str = "error"
    toy_task: str = "addition"
    toy_train_size: int = 7000
    toy_low: int = 10
    toy_high: int = 99

    def _check(self) -> None:
        check_data_path(self.key("train_path"), self.train_path)
        check_data_path(self.key("eval_path"), self.eval_path)
        for name in ("problem_key", "answer_key", "eval_problem_key", "eval_answer_key"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{self.key(name)} must be a non-empty field name, got {value!r}")
        check_choice(self.key("answer_mode"), self.answer_mode, ANSWER_MODES)
        check_choice(self.key("prompt_overflow"), self.prompt_overflow, PROMPT_OVERFLOW)
        check_choice(self.key("empty_answers"), self.empty_answers, EMPTY_ANSWERS)
        check_choice(self.key("toy_task"), self.toy_task, TOY_TASKS)
        if self.eval_answer_mode is not None:
            check_choice(self.key("eval_answer_mode"), self.eval_answer_mode, ANSWER_MODES)
        self.template = TEMPLATE_ALIASES.get(self.template, self.template)
        if self.template not in TEMPLATES and "{problem}" not in self.template:
            raise ValueError(f"{self.key('template')} must be one of {TEMPLATES + tuple(TEMPLATE_ALIASES)} or a "
                             f"string containing '{{problem}}', got {self.template!r}")
        for name in ("eval_size", "max_prompt_len", "toy_train_size"):
            self._min(name, 1)
        self._min("toy_low", 0)
        if self.toy_high < self.toy_low:
            raise ValueError(f"{self.key('toy_high')} must be >= data.toy_low ({self.toy_low}), got {self.toy_high}")
        if self.train_path is None:
            arity = 3 if self.toy_task == "corrections" else 2
            pairs = (self.toy_high - self.toy_low + 1) ** arity
            held_out = self.eval_size if self.eval_path is None else 0
            if self.toy_train_size + held_out > pairs:
                kind, power = ("triples", "³") if arity == 3 else ("pairs", "²")
                raise ValueError(
                    f"{self.key('toy_train_size')} must be <= {pairs - held_out} (the {pairs} distinct operand {kind} "
                    f"in [{self.toy_low}, {self.toy_high}]{power} minus data.eval_size={held_out} held out), "
                    f"got {self.toy_train_size}"
                )
