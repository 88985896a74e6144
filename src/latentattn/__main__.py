from latentattn.cli import main

raise SystemExit(main())
