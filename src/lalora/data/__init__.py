"""The tasks: benchmark records and the user's own files to prompts, the generated task, the
prepared splits."""
