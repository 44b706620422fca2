"""Errors that end a job (exit code 2) with one clear line for the user."""


class JobError(Exception):
    """The job cannot run: bad input file, unknown column, missing model, unwritable output."""
