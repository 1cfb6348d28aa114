from prompttune.cli import main

raise SystemExit(main())
