"""The errors that end a job: a job that cannot run (exit code 2), and a run asked to stop (130)."""


class JobError(Exception):
    """The job cannot run: bad input file, unknown column, missing model, unwritable output."""


class Interrupted(Exception):
    """The run was asked to stop; finished rows are committed and re-running resumes."""
