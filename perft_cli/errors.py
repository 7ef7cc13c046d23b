"""User-facing errors: one exception type, printed once as a single line by the CLI (exit code 1)."""


class PerftError(Exception):
    """A problem the user can fix (bad recipe, missing file, unsupported model, bad data).

    The message is one line that says what is wrong and what to do.
    """


class RecipeError(PerftError):
    """The recipe (YAML or --set override) is malformed or inconsistent."""


class DataError(PerftError):
    """A dataset file or record is missing, malformed or empty."""


class ModelError(PerftError):
    """The model cannot be loaded or is not a supported MoE family."""


class CheckpointError(PerftError):
    """A checkpoint is missing, incomplete or does not match the recipe."""
