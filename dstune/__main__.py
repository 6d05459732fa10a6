from dstune.cli import main

main()
