"""The evaluation room: asking models questions and scoring the answers.

- `prompts`: the prompt schema, prompt files, the scorer, accuracy per tag (no torch: the recipe
  imports it);
- `generation`: batched greedy generation and perplexity with transformers;
- `comparison`: runs side by side; `retrieval`: the BM25 notes-retrieval baseline.

May import: labtune.errors, labtune.precision, labtune.data, labtune.recipe (the Prompt schema).
"""
