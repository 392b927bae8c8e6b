"""The error a training job that cannot start raises; finetune_visualglm.main() prints it as `error: ...`."""


class ConfigError(Exception):
    """The flags, the files they name or the launcher's environment do not make a job that can run."""
