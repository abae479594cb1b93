"""custom-lang: answers invocations with a configurable status per name."""
