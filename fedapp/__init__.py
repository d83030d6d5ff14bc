"""The Flower app: server, client and tools. Importing it first makes the console readable
(`fedapp.console`), in every process that runs any of them."""

from fedapp.console import configure_console

configure_console()
