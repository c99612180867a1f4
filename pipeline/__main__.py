from pairsift.pipeline.cli import main

main()
