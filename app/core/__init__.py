"""The leaves every layer uses: errors, settings, the one image loader, hashing, logs, tracing, progress,
the training recipe's constants, the labelled-folder rule, API keys and card signatures. Imports nothing
above it."""
