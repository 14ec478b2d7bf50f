from vlp.cli import main

raise SystemExit(main())
