"""The data room: lab notes in, training conversations and tokens out.

- `notes`, `note_fields`, `note_prose`, `note_sections`, `note_dates`: reading notes as labs write them;
- `augment`: every fact in many wordings, and the held-out evaluation prompts;
- `conversations`: every input a lab has (notes, ShareGPT, Alpaca), cleaned and counted;
- `chat`: chat templates and the loss mask; `encode`: tokenized, loss-masked examples;
- `words`: whole-word matching, shared with the scorer; `watch`: fingerprints of a notes folder.

May import: labtune.errors, labtune.store, labtune.recipe (its types, for type hints only).
"""
