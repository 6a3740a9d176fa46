"""streamload: stream int8 language models over HTTP and run them while they download."""
