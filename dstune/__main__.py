from dstune.cli import entry

entry()
