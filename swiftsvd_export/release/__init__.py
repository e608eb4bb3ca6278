"""``release`` / ``run``: config -> compress -> export -> validate -> threshold gate, one folder."""
