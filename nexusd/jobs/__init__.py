"""Jobs: what a generate/embed/classify job does (`engine`), how the API submits, streams
and resumes it (`service`), and its durable record (`journal`)."""
